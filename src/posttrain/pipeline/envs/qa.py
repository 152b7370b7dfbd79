"""Single-turn problems with a verifiable answer: `env=math` (question/answer data), `env=arithmetic`,
`env=reasoning_gym:TASK[:options]` and code (`env=code`, `envs.code`).

One `QAEnv` per problem (the cookbook's `ProblemEnv`): the model answers once, the reward is the answer's score
(`scoring`: the problem's grader, the sandboxed tests, or the user's `reward_fn=`) minus a small penalty for a
malformed response. The sources differ only in where the problems come from.
"""

from __future__ import annotations

import difflib
import json
import random
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import tinker
from tinker_cookbook import renderers
from tinker_cookbook.rl.problem_env import ProblemEnv
from tinker_cookbook.rl.types import Action, ActionExtra, StepResult

from posttrain.errors import ConfigError
from posttrain.pipeline.envs.base import (
    EVAL_SEED_OFFSET,
    EnvContext,
    Environment,
    Episode,
    ProblemSet,
    mean_score,
    n_train,
    problem_group,
    prompt_messages,
)
from posttrain.pipeline.scoring.grading import looks_mathematical
from posttrain.pipeline.scoring.scorer import Scored

if TYPE_CHECKING:
    from tinker_cookbook.renderers import Message
    from tinker_cookbook.rl.types import EnvGroupBuilder

    from posttrain.pipeline.data import LoadedData
    from posttrain.pipeline.envs.base import ProblemSettings
    from posttrain.pipeline.envs.spec import EnvSpec
    from posttrain.pipeline.results import RLExample

# The task names reasoning-gym 0.1.25 registers (a test pins them to its registry): a mistyped name is
# reported at once, without importing reasoning-gym and its ~100 generators (seconds).
REASONING_GYM_TASKS = frozenset(
    {
        "ab",
        "acre",
        "advanced_geometry",
        "aiw",
        "arc_1d",
        "arc_agi",
        "base_conversion",
        "basic_arithmetic",
        "bf",
        "binary_alternation",
        "binary_matrix",
        "bitwise_arithmetic",
        "boxnet",
        "caesar_cipher",
        "calendar_arithmetic",
        "chain_sum",
        "circuit_logic",
        "codeio",
        "coin_flip",
        "color_cube_rotation",
        "complex_arithmetic",
        "composite",
        "count_bits",
        "count_primes",
        "countdown",
        "course_schedule",
        "cryptarithm",
        "decimal_arithmetic",
        "decimal_chain_sum",
        "dice",
        "emoji_mystery",
        "family_relationships",
        "figlet_font",
        "fraction_simplification",
        "futoshiki",
        "game_of_life",
        "game_of_life_halting",
        "gcd",
        "graph_color",
        "group_anagrams",
        "gsm_symbolic",
        "intermediate_integration",
        "isomorphic_strings",
        "jugs",
        "kakurasu",
        "knight_swap",
        "knights_knaves",
        "largest_island",
        "lcm",
        "leg_counting",
        "letter_counting",
        "letter_jumble",
        "list_functions",
        "mahjong_puzzle",
        "manipulate_matrix",
        "maze",
        "mini_sudoku",
        "modulo_grid",
        "n_queens",
        "needle_haystack",
        "number_filtering",
        "number_format",
        "number_sequence",
        "number_sorting",
        "palindrome_generation",
        "palindrome_partitioning",
        "path_star",
        "polynomial_equations",
        "polynomial_multiplication",
        "pool_matrix",
        "power_function",
        "prime_factorization",
        "products",
        "propositional_logic",
        "puzzle24",
        "quantum_lock",
        "ransom_note",
        "rearc",
        "rectangle_count",
        "rotate_matrix",
        "rotten_oranges",
        "rubiks_cube",
        "rush_hour",
        "self_reference",
        "sentence_reordering",
        "shortest_path",
        "simple_equations",
        "simple_geometry",
        "simple_integration",
        "sokoban",
        "spell_backward",
        "spiral_matrix",
        "string_insertion",
        "string_manipulation",
        "string_splitting",
        "string_synthesis",
        "sudoku",
        "survo",
        "syllogism",
        "time_intervals",
        "tower_of_hanoi",
        "tsumego",
        "word_ladder",
        "word_sequence_reversal",
        "word_sorting",
        "zebra_puzzles",
    }
)


Source = Callable[["EnvSpec", "ProblemSettings", "LoadedData | None"], ProblemSet]


class QAEnv(ProblemEnv):
    """One problem; the reward is its score in [0, 1] (`scoring`: a grader, the sandboxed tests or the user's
    verifier), minus a small penalty for a malformed response. Keeps what it scored, for the results row."""

    def __init__(self, problem: dict, ctx: EnvContext, format_coef: float = 0.1):
        super().__init__(ctx.renderer, convo_prefix=None, format_coef=format_coef)
        self.problem, self.ctx = problem, ctx
        self.completion = ""
        self.scored: Scored | None = None

    def get_question(self) -> str:
        return prompt_messages(self.problem)[0]["content"]

    def check_answer(self, sample_str: str) -> bool:
        raise NotImplementedError("QAEnv scores asynchronously in step()")

    def check_format(self, sample_str: str) -> bool:
        return bool(sample_str.strip())

    def get_reference_answer(self) -> str:
        return str(self.problem["answer"])

    async def step(self, action: Action, *, extra: ActionExtra | None = None) -> StepResult:
        # The cookbook's ProblemEnv.step grades synchronously; sandboxed tests must not block the event loop
        # that samples the other rollouts, so the score is awaited here (same reward formula as ProblemEnv).
        message, termination = self.renderer.parse_response(action)
        self.completion = renderers.get_text_content(message)
        well_formed = termination.is_stop_sequence and self.check_format(self.completion)
        self.scored = scored = await self.ctx.scorer.score(self.problem, self.completion, self.ctx.phase)
        reward = self.format_coef * (float(well_formed) - 1) + scored.reward
        metrics = {"format": float(well_formed), "correct": float(scored.correct), "score": scored.reward}
        if self.ctx.scorer.verifier is not None:
            metrics["verifier_error"] = float(scored.verifier_error is not None)
        return StepResult(
            reward=reward,
            episode_done=True,
            next_observation=tinker.ModelInput.empty(),
            next_stop_condition=self.stop_condition,
            metrics=metrics,
        )


def make_qa_env(problem: dict, ctx: EnvContext) -> QAEnv:
    return QAEnv(problem, ctx)


@dataclass(frozen=True)
class SingleTurn(Environment):
    """A single-turn environment: its problems from `source`, everything else shared."""

    source: Source
    score_label: str = "accuracy"
    tag: str = "train"
    noun: str = "problems"
    takes_verifier: bool = True

    def problems(self, spec: EnvSpec, cfg: ProblemSettings, data: LoadedData | None) -> ProblemSet:
        return self.source(spec, cfg, data)

    def prompt(self, problem: dict, ctx: EnvContext) -> list[Message]:
        return prompt_messages(problem)

    def max_turns(self, spec: EnvSpec) -> int:
        return 1

    def make_env(self, problem: dict, ctx: EnvContext) -> QAEnv:
        return make_qa_env(problem, ctx)

    def group_builder(self, problem: dict, ctx: EnvContext, group_size: int) -> EnvGroupBuilder:
        return problem_group(make_qa_env, problem, ctx, group_size, self.tag)

    def row(self, index: int, problem: dict, episode: Episode) -> RLExample:
        from posttrain.pipeline.results import RLExample

        env = episode.env
        assert isinstance(env, QAEnv) and env.scored is not None
        scored = env.scored
        record = RLExample(
            index,
            problem["question"],
            str(problem["answer"]),
            env.completion,
            scored.extracted,
            scored.correct,
        )
        # 0/1 graders need no separate reward (it is `correct`); tests and verifiers give fractions.
        record.reward = scored.reward if env.ctx.scorer.verifier is not None or scored.details else None
        # Which grader scored the row (user verifier aside): the data's own choice, e.g. f1 for factual QA.
        grader = {} if env.ctx.scorer.verifier is not None else {"grader": problem.get("grader", "math")}
        record.details = {**grader, **scored.details} or None
        record.verifier_error = scored.verifier_error
        return record

    def score(self, rows: Sequence[RLExample]) -> float:
        return mean_score(rows)


# ------------------------------------------------------------------------------------------------ sources


def qa_problems(rows: list[dict], grader: str = "math") -> list[dict]:
    # The row itself is kept: a user verifier (reward_fn=) is given it.
    return [
        {
            "question": r["question"],
            "answer": r.get("final_answer") or r["answer"],
            "grader": grader,
            "row": r,
        }
        for r in rows
    ]


# The share of answers that must look mathematical for the math grader to be chosen.
MATH_SHARE = 0.9


def choose_grader(rows: list[dict], setting: str | None) -> tuple[str, str]:
    """The grader of question/answer data and why: `grader=` as set, else the math grader when (nearly) every
    answer is a number, an expression or LaTeX, else token F1 (factual QA, as the user's document grades it)."""
    if setting is not None:
        return setting, "grader=" + setting
    answers = [str(r.get("final_answer") or r["answer"]) for r in rows]
    share = sum(map(looks_mathematical, answers)) / max(len(answers), 1)
    if share >= MATH_SHARE:
        return "math", f"{share:.0%} of the answers are numbers, expressions or LaTeX"
    return "f1", f"{1 - share:.0%} of the answers are text (factual QA: token F1, exact match as correct)"


GRADER_LABELS = {
    "math": "accuracy",
    "exact_match": "exact match",
    "f1": "token F1 (correct = exact match)",
}


def from_dataset(spec: EnvSpec, cfg: ProblemSettings, data: LoadedData | None) -> ProblemSet:
    """env=math (or question/answer data with no env=): the dataset's rows."""
    if data is None or data.format != "question_answer":
        raise ConfigError(
            "env=math needs a dataset with question/answer columns (or problem/solution, ground_truth)"
        )
    grader, why = choose_grader(data.train + data.eval, cfg.grader)
    info = {
        "source": data.source,
        "eval_source": data.eval_source,
        "grader": grader,
        "grader_reason": why,
        "score_label": GRADER_LABELS[grader],
    }
    return ProblemSet(qa_problems(data.train, grader), qa_problems(data.eval, grader), info)


def arithmetic_problems(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        x, y = rng.randint(0, 100), rng.randint(0, 100)
        out.append({"question": f"What is {x} + {y}?", "answer": str(x + y), "grader": "math"})
    return out


def from_arithmetic(spec: EnvSpec, cfg: ProblemSettings, data: LoadedData | None) -> ProblemSet:
    return ProblemSet(
        arithmetic_problems(n_train(cfg), cfg.seed),
        arithmetic_problems(min(cfg.max_eval_rows, 100), cfg.seed + 1),
        {"source": "arithmetic: x + y, 0 <= x, y <= 100 (the cookbook's arithmetic task)"},
    )


def reasoning_gym_problems(spec: EnvSpec, n: int, seed: int) -> list[dict]:
    task = spec.variant
    if task not in REASONING_GYM_TASKS:
        close = difflib.get_close_matches(task, REASONING_GYM_TASKS, n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else " (see reasoning_gym.factory.DATASETS)"
        raise ConfigError(f"env=reasoning_gym:{task}: no such reasoning-gym task{hint}")
    with warnings.catch_warnings():  # one of its dependencies has SyntaxWarnings (`is` with a literal)
        warnings.simplefilter("ignore", SyntaxWarning)
        import reasoning_gym

    try:
        dataset = reasoning_gym.create_dataset(task, size=n, seed=seed, **spec.options)
    except Exception as exc:  # noqa: BLE001 - unknown options raise various errors
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
                "grader": "reasoning_gym",
                "task": task,
                "entry": entry,
            }
        )
    return problems


def from_reasoning_gym(spec: EnvSpec, cfg: ProblemSettings, data: LoadedData | None) -> ProblemSet:
    if not spec.variant:
        raise ConfigError("env=reasoning_gym needs a task: env=reasoning_gym:TASK (e.g. basic_arithmetic)")
    count = n_train(cfg)
    eval_seed = cfg.seed + EVAL_SEED_OFFSET
    return ProblemSet(
        reasoning_gym_problems(spec, count, cfg.seed),
        reasoning_gym_problems(spec, min(cfg.max_eval_rows, max(int(count * 0.1), 50)), eval_seed),
        {"source": f"reasoning-gym task {spec.variant!r} (generated, seeds {cfg.seed} / {eval_seed})"},
    )


def _no_variant(source: Source) -> Source:
    def checked(spec: EnvSpec, cfg: ProblemSettings, data: LoadedData | None) -> ProblemSet:
        if spec.variant or spec.options:
            raise ConfigError(f"env={spec}: env={spec.name} takes no variant or options")
        return source(spec, cfg, data)

    return checked


MATH = SingleTurn(_no_variant(from_dataset))
ARITHMETIC = SingleTurn(_no_variant(from_arithmetic))
REASONING_GYM = SingleTurn(from_reasoning_gym)
