"""What every RL environment is: one module behind `Environment`, one registry line (`envs.registry`).

An environment makes its problems (generated, or from the user's data), builds the cookbook `Env` for one
problem, and reads a finished episode as a results row. Training and evaluation run the very same `Env`: the
cookbook's `rl.train` through `EnvironmentDataset` (`envs.dataset`, the one RL dataset class), the evaluation
through the cookbook's own rollout function (`evaluation.episodes`), so the reward trained on and the score
reported cannot disagree.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from functools import partial
from typing import TYPE_CHECKING, Any, Protocol

from posttrain.pipeline.scoring.grading import ANSWER_INSTRUCTION

if TYPE_CHECKING:
    from tinker_cookbook.completers import MessageCompleter
    from tinker_cookbook.renderers import Message, Renderer
    from tinker_cookbook.rl.types import Env, EnvGroupBuilder, Trajectory

    from posttrain.pipeline.data import LoadedData
    from posttrain.pipeline.envs.spec import EnvSpec
    from posttrain.pipeline.results import RLExample
    from posttrain.pipeline.scoring.judge import Judge
    from posttrain.pipeline.scoring.scorer import Scorer

# Held-out problems of generated sources use this seed offset, so they never repeat training ones.
EVAL_SEED_OFFSET = 1_000_003


class ProblemSettings(Protocol):
    """The run's settings an environment makes its problems from (task=rl's and distillation's configs have them)."""

    seed: int
    batch_size: int
    max_steps: int | None
    max_train_rows: int
    max_eval_rows: int
    model_name: str
    renderer_name: str | None
    game_opponent: str | None
    grader: str | None  # question/answer data: math|exact_match|f1, None: chosen from the data


@dataclass(frozen=True)
class ProblemSet:
    train: list[dict]
    eval: list[dict]
    info: dict[str, Any] = field(default_factory=dict)
    # More held-out sets scored the same way as `eval` and reported beside it (e.g. HumanEval for env=code).
    extra_eval: dict[str, list[dict]] = field(default_factory=dict)


@dataclass(frozen=True)
class EnvContext:
    """What every episode of a run is given."""

    spec: EnvSpec
    renderer: Renderer
    scorer: Scorer
    judge: Judge | None = None  # the rubric environment's grader model
    # a game's other player, a served model (twenty questions' answerer)
    partner: MessageCompleter | None = None
    phase: str = "train"  # or the model evaluated ("base model"): a user verifier's errors are counted by it

    def for_phase(self, phase: str) -> EnvContext:
        return replace(self, phase=phase)


@dataclass
class Episode:
    """A finished episode: its env (which may keep what it saw) and the cookbook's trajectory."""

    env: Env
    trajectory: Trajectory
    renderer: Renderer

    def texts(self) -> list[str]:
        """What the model wrote at each turn."""
        from tinker_cookbook.renderers import get_text_content

        return [
            get_text_content(self.renderer.parse_response(t.ac.tokens)[0])
            for t in self.trajectory.transitions
        ]


class Environment(Protocol):
    """One RL environment (`env=NAME[:VARIANT[:options]]`; `task=rubric`'s judged conversations)."""

    tag: str  # its training metrics' group (the cookbook's logging tag)
    score_label: str  # what its held-out score is ("accuracy", "win rate", ...)
    noun: str  # what its problems are ("problems", "games", "conversations")
    takes_verifier: bool  # whether a user's reward_fn= can score it (a game decides its own reward)

    def problems(self, spec: EnvSpec, cfg: ProblemSettings, data: LoadedData | None) -> ProblemSet:
        """Training and held-out problems; a one-line ConfigError when the spec or data do not fit."""
        ...

    def prompt(self, problem: dict, ctx: EnvContext) -> list[Message]:
        """The conversation the model first sees (for the plan's token counts and the template check)."""
        ...

    def max_turns(self, spec: EnvSpec) -> int:
        """The most turns an episode takes (1: single-turn)."""
        ...

    def make_env(self, problem: dict, ctx: EnvContext) -> Env:
        """One rollout of one problem: the cookbook Env, used alike in training and evaluation."""
        ...

    def group_builder(self, problem: dict, ctx: EnvContext, group_size: int) -> EnvGroupBuilder:
        """The rollouts of one problem that one RL group compares."""
        ...

    def row(self, index: int, problem: dict, episode: Episode) -> RLExample:
        """A finished held-out episode as a results row (RL schema)."""
        ...

    def score(self, rows: Sequence[RLExample]) -> float:
        """The held-out score of a model from its rows."""
        ...

    # Optional capabilities: an environment that has them defines them; these defaults say it has not.

    def summary(self, rows: dict[str, list[RLExample]]) -> dict[str, Any]:
        """Fields for summary.json from the evaluations by model label (none by default)."""
        return {}

    def demonstrates(self, spec: EnvSpec) -> bool:
        """Whether it can make worked answers of its problems for a supervised warm start (`warm_start_steps`)."""
        return False


def prompt_messages(problem: dict, instruction: str = ANSWER_INSTRUCTION) -> list[Message]:
    """A single-turn problem's prompt: its question and the instruction that says how to answer (the problem's
    own, e.g. code asks for a code block; else the final answer after '####')."""
    instruction = problem.get("instruction", instruction)
    text = problem["question"].rstrip()
    return [{"role": "user", "content": f"{text}\n{instruction}" if instruction else text}]


def problem_group(
    make_env: Callable[[dict, EnvContext], Env], problem: dict, ctx: EnvContext, size: int, tag: str
):
    """`size` independent rollouts of one problem (the cookbook's ProblemGroupBuilder, which takes any Env)."""
    from tinker_cookbook.rl.problem_env import ProblemGroupBuilder

    return ProblemGroupBuilder(env_thunk=partial(make_env, problem, ctx), num_envs=size, dataset_name=tag)  # type: ignore[arg-type]


def mean_score(rows: Sequence[RLExample]) -> float:
    """The mean of each row's reward (a fraction: tests passed, a verifier's value), else of its correctness; a
    failed example counts as 0."""
    if not rows:
        return float("nan")
    total = sum(
        0.0
        if r.error and r.reward is None
        else (r.reward if r.reward is not None else float(bool(r.correct)))
        for r in rows
    )
    return total / len(rows)


def n_train(cfg: ProblemSettings) -> int:
    """Generated problems: enough for every step (or 50 steps when none is set), at least 64, within the limit."""
    return min(cfg.max_train_rows, max(cfg.batch_size * (cfg.max_steps or 50), 64))


def n_eval(cfg: ProblemSettings, cap: int = 50) -> int:
    return min(cfg.max_eval_rows, cap)
