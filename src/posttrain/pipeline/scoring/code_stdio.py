"""Code answers judged on stdin/stdout, as LiveCodeBench and DeepCoder publish them: the model writes a whole
program; each test feeds its input on stdin and compares what the program prints with the expected output.

Row layouts (both also carry a statement in `question`, `prompt` or `problem`, like the assert form):

    {"question": "Read two integers and print their sum.", "inputs": ["1 2\\n", "5 7\\n"],
     "outputs": ["3\\n", "12\\n"]}
    {"question": "...", "tests": [{"input": "1 2\\n", "output": "3\\n"}, ...]}  # or as a JSON string

Each test is one run of the program in its own sandbox (`sandbox.run_python`, with its limits): a fresh
process per test, so no state leaks from one input to the next, as on a judge. The expected output never
enters the sandbox. Outputs are compared line by line after stripping trailing whitespace per line and
trailing blank lines. The reward is the fraction of tests passed.
"""

from __future__ import annotations

import dataclasses
import json
import re
from typing import Any

from posttrain.errors import DataError
from posttrain.pipeline.scoring import sandbox
from posttrain.pipeline.scoring.code import CodeResult, extract_code

STDIO_INSTRUCTION = (
    "Write a complete Python program that reads its input from standard input and prints the answer to "
    "standard output, in a ```python code block."
)
_MARK = "@@posttrain-error@@"
_PYTHON_TAGS = ("python", "python3", "py")

# Runs inside the sandbox as main.py: the test's input becomes fd 0 (so input(), sys.stdin and open(0) all
# read it) and stderr goes nowhere, so only the program's own stdout is compared. A compile error is reported
# apart from a crash: it does not depend on the input, so the other tests need not run.
_HARNESS = """\
import os, sys
_fd = os.open("/sandbox/input.txt", os.O_RDONLY)
os.dup2(_fd, 0)
os.close(_fd)
_fd = os.open(os.devnull, os.O_WRONLY)
os.dup2(_fd, 2)
os.close(_fd)
def _fail(kind, error):
    try:
        sys.stdout.write("\\n{mark}" + kind + ":" + type(error).__name__ + "\\n")
    except BaseException:
        pass
    raise SystemExit(1)
try:
    _code = compile(open("/sandbox/solution.py").read(), "solution.py", "exec")
except (SyntaxError, ValueError) as e:
    _fail("compile", e)
try:
    exec(_code, {{"__name__": "__main__"}})
except SystemExit:
    raise
except BaseException as e:
    _fail("runtime", e)
"""
_FAILURE = re.compile(re.escape(_MARK) + r"(compile|runtime):(\w+)")

WRONG_ANSWER = "wrong answer"
TIMEOUT = "timeout"
COMPILE_ERROR = "does not compile"


def is_stdio_row(row: dict) -> bool:
    """Whether a code row is judged on stdin/stdout (inputs/outputs, or tests given as input/output objects)
    rather than by `assert` strings."""
    if row.get("inputs") is not None or row.get("outputs") is not None:
        return True
    tests = row.get("tests")
    if isinstance(tests, str) and tests.lstrip().startswith("["):
        return True
    return isinstance(tests, list) and any(isinstance(t, dict) for t in tests)


def parse_tests(row: dict, where: str) -> list[dict[str, str]]:
    """The row's tests as [{"input", "output"}]; a one-line DataError naming the field for anything else."""
    if row.get("inputs") is not None or row.get("outputs") is not None:
        if row.get("tests") is not None:
            raise DataError(f'{where}: a code problem has either "tests" or "inputs"/"outputs", not both')
        inputs = _strings(row, "inputs", where)
        outputs = _strings(row, "outputs", where)
        if len(inputs) != len(outputs):
            raise DataError(
                f'{where}: field "outputs" has {len(outputs)} items but "inputs" has {len(inputs)}; '
                "they must pair up"
            )
        return [{"input": i, "output": o} for i, o in zip(inputs, outputs, strict=True)]
    tests = row.get("tests")
    if isinstance(tests, str):
        try:
            tests = json.loads(tests)
        except ValueError as e:
            raise DataError(
                f'{where}: field "tests" is a string but not a JSON list of tests ({e})'
            ) from None
    if not isinstance(tests, list) or not tests:
        raise DataError(f'{where}: field "tests" must be a non-empty list of {{"input", "output"}} objects')
    return [_test(t, where, f"tests[{i}]") for i, t in enumerate(tests)]


def _strings(row: dict, field: str, where: str) -> list[str]:
    values = row.get(field)
    if values is None:
        raise DataError(
            f'{where}: field "{field}" is missing (stdin/stdout tests need both inputs and outputs)'
        )
    if not isinstance(values, list) or not values:
        raise DataError(f'{where}: field "{field}" must be a non-empty list of strings')
    for i, value in enumerate(values):
        if not isinstance(value, str):
            raise DataError(f'{where}: field "{field}[{i}]" must be a string, got {_type_name(value)}')
    return values


def _test(test: Any, where: str, field: str) -> dict[str, str]:
    if not isinstance(test, dict):
        raise DataError(
            f'{where}: field "{field}" must be an {{"input", "output"}} object, got {_type_name(test)}'
        )
    # LiveCodeBench marks each test; its "functional" tests call a method and cannot be judged on stdin.
    kind = test.get("testtype", "stdin")
    if kind != "stdin":
        raise DataError(f'{where}: field "{field}.testtype" is {kind!r}; only "stdin" tests are supported')
    for key in ("input", "output"):
        if key not in test or test[key] is None:
            raise DataError(f'{where}: field "{field}.{key}" is missing')
        if not isinstance(test[key], str):
            raise DataError(f'{where}: field "{field}.{key}" must be a string, got {_type_name(test[key])}')
    return {"input": test["input"], "output": test["output"]}


def _type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def problem_from_row(row: dict, statement: str, where: str) -> dict:
    tests = parse_tests(row, where)
    return {
        "question": statement,
        "answer": _reference(tests),
        "tests": tests,
        "grader": "code_stdio",
        "instruction": STDIO_INSTRUCTION,
        "row": row,
    }


def _reference(tests: list[dict[str, str]], cap: int = 300) -> str:
    # What results rows show as the ground truth: the first test, cut short (judges' inputs can be megabytes).
    first = tests[0]
    return (
        f"{len(tests)} stdin/stdout test(s); test 1 input:\n{first['input'][:cap]}\n"
        f"expected output:\n{first['output'][:cap]}"
    )


def extract_program(completion: str) -> str:
    """The program in a completion: the last non-empty ```python block; else as `extract_code` finds code."""
    if "```" in completion:
        # A piece after a fence whose first line is a Python tag opens a block: closing fences carry no tag.
        blocks = [
            rest
            for piece in completion.split("```")[1:]
            for tag, _, rest in [piece.partition("\n")]
            if tag.strip().lower() in _PYTHON_TAGS and rest.strip()
        ]
        if blocks:
            return blocks[-1].strip("\n")
    return extract_code(completion)


def normalize_output(text: str) -> str:
    lines = [line.rstrip() for line in text.splitlines()]
    while lines and not lines[-1]:
        lines.pop()
    return "\n".join(lines)


def grade(problem: dict, completion: str, limits: sandbox.Limits | None = None) -> CodeResult:
    """Run the program once per test in the sandbox (blocking: call it in a thread); the reward is the
    fraction of tests whose output matches.

    After a compile error or a timeout the remaining tests are not run and count as failed: a compile error
    would repeat on every input, and a program that hangs would otherwise cost the time limit per test."""
    limits = limits or sandbox.Limits()
    code = extract_program(completion)
    results: list[dict[str, Any]] = []
    stop = ""
    for test in problem["tests"]:
        failure = stop or _run_test(code, test, limits)
        if not stop and failure == TIMEOUT:
            stop = "not run: an earlier test timed out"
        elif not stop and failure.startswith(COMPILE_ERROR):
            stop = failure
        results.append({"passed": True} if not failure else {"passed": False, "failure": failure})
    passed = sum(r["passed"] for r in results)
    note = next((f"test {i + 1}: {r['failure']}" for i, r in enumerate(results) if not r["passed"]), "")
    return CodeResult(passed / len(results), code, passed, len(results), note, tuple(results))


def _run_test(code: str, test: dict[str, str], limits: sandbox.Limits) -> str:
    """Why the program fails this test ("" when it passes)."""
    want = normalize_output(test["output"])
    # The output cap must leave room for the expected output itself, however large the judge's answer is.
    room = 2 * len(want.encode()) + 4096
    if room > limits.max_output_bytes:
        limits = dataclasses.replace(limits, max_output_bytes=room)
    run = sandbox.run_python(
        _HARNESS.format(mark=_MARK), limits, {"solution.py": code, "input.txt": test["input"]}
    )
    if run.timed_out:
        return TIMEOUT
    if run.truncated:
        return "output limit"
    if run.returncode != 0:
        # The harness reports last; anything like it printed earlier is the program's own.
        found = _FAILURE.findall(run.output)
        if found and found[-1][0] == "compile":
            return f"{COMPILE_ERROR}: {found[-1][1]}"
        if found:
            return f"runtime error: {found[-1][1]}"
        if run.returncode is not None and run.returncode < 0:
            return f"runtime error: killed by signal {-run.returncode}"
        return f"runtime error: exit code {run.returncode}"
    return "" if normalize_output(run.output) == want else WRONG_ANSWER
