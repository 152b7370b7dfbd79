"""The cookbook RL environment over verifiable-reward problems: one `ProblemEnv` per problem, and the dataset
builder the cookbook's `rl.train` loop calls.

Problems (see `problems` and `grading`) are written to a JSONL file in the run's log directory, so a run can
be reproduced from its logs, and the dataset builder (a `chz` config, like every cookbook builder) only carries
that path.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from functools import partial
from pathlib import Path

import chz
import tinker
from tinker_cookbook import renderers
from tinker_cookbook.rl.problem_env import ProblemEnv, ProblemGroupBuilder
from tinker_cookbook.rl.types import (
    Action,
    ActionExtra,
    EnvGroupBuilder,
    RLDataset,
    RLDatasetBuilder,
    StepResult,
)
from tinker_cookbook.tokenizer_utils import get_tokenizer

from posttrain.pipeline.scoring.grading import ANSWER_INSTRUCTION
from posttrain.pipeline.scoring.scorer import Scorer
from posttrain.pipeline.scoring.verifiers import DEFAULT_TIMEOUT_S, UserVerifier
from posttrain.util import read_jsonl


def prompt_messages(problem: dict, instruction: str = ANSWER_INSTRUCTION) -> list[renderers.Message]:
    # A problem may carry its own instruction (code problems ask for a code block, not '####').
    instruction = problem.get("instruction", instruction)
    text = problem["question"].rstrip()
    return [{"role": "user", "content": f"{text}\n{instruction}" if instruction else text}]


def make_scorer(reward_fn: str | None, errors_file: str | None, timeout: float = DEFAULT_TIMEOUT_S) -> Scorer:
    if not reward_fn:
        return Scorer()
    return Scorer(UserVerifier(reward_fn, Path(errors_file) if errors_file else None, timeout))


class QAEnv(ProblemEnv):
    """One problem; the reward is its score in [0, 1] (`scoring`: a grader, the sandboxed tests or the user's
    verifier), minus a small penalty for a malformed response."""

    def __init__(
        self,
        problem: dict,
        renderer: renderers.Renderer,
        instruction: str,
        scorer: Scorer | None = None,
        format_coef: float = 0.1,
    ):
        super().__init__(renderer, convo_prefix=None, format_coef=format_coef)
        self.problem = problem
        self.instruction = instruction
        self.scorer = scorer or Scorer()

    def get_question(self) -> str:
        return prompt_messages(self.problem, self.instruction)[0]["content"]

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
        content = renderers.get_text_content(message)
        well_formed = termination.is_stop_sequence and self.check_format(content)
        scored = await self.scorer.score(self.problem, content, "train")
        reward = self.format_coef * (float(well_formed) - 1) + scored.reward
        metrics = {"format": float(well_formed), "correct": float(scored.correct), "score": scored.reward}
        if self.scorer.verifier is not None:
            metrics["verifier_error"] = float(scored.verifier_error is not None)
        return StepResult(
            reward=reward,
            episode_done=True,
            next_observation=tinker.ModelInput.empty(),
            next_stop_condition=self.stop_condition,
            metrics=metrics,
        )


def batch_indices(n_problems: int, groups_per_batch: int, seed: int, index: int) -> list[int]:
    """The problems of batch `index`: a seeded order, epoch after epoch, so batch i is the same on resume."""
    per_epoch = max(1, n_problems // groups_per_batch)
    epoch, offset = divmod(index, per_epoch)
    order = list(range(n_problems))
    random.Random(seed + epoch).shuffle(order)
    start = offset * groups_per_batch
    return [order[(start + k) % len(order)] for k in range(groups_per_batch)]


class ProblemDataset(RLDataset):
    def __init__(
        self,
        problems: list[dict],
        renderer: renderers.Renderer,
        groups_per_batch: int,
        group_size: int,
        instruction: str,
        n_batches: int,
        seed: int,
        scorer: Scorer | None = None,
    ):
        self.scorer = scorer or Scorer()
        self.problems = problems
        self.renderer = renderer
        self.groups_per_batch = groups_per_batch
        self.group_size = group_size
        self.instruction = instruction
        self.n_batches = n_batches
        self.seed = seed

    def get_batch(self, index: int) -> Sequence[EnvGroupBuilder]:
        chosen = batch_indices(len(self.problems), self.groups_per_batch, self.seed, index)
        return [
            ProblemGroupBuilder(
                env_thunk=partial(QAEnv, self.problems[i], self.renderer, self.instruction, self.scorer),
                num_envs=self.group_size,
                dataset_name="train",
            )
            for i in chosen
        ]

    def __len__(self) -> int:
        return self.n_batches


@chz.chz
class RowsFileBuilder(RLDatasetBuilder):
    """What every RL dataset builder of ours carries: the rows the pipeline wrote to the run's logs (a builder
    is a config the cookbook logs and may rebuild, so it holds a path, not the rows) and how to batch them."""

    rows_file: str
    model_name_for_tokenizer: str
    renderer_name: str
    groups_per_batch: int
    group_size: int
    n_batches: int
    seed: int = 0

    def rows(self) -> list[dict]:
        return read_jsonl(self.rows_file)

    def renderer(self) -> renderers.Renderer:
        return renderers.get_renderer(self.renderer_name, tokenizer=get_tokenizer(self.model_name_for_tokenizer))


@chz.chz
class ScoredRowsBuilder(RowsFileBuilder):
    """Rows whose answers are scored (`scoring`), optionally by the user's `reward_fn` with its timeout."""

    reward_fn: str | None = None  # path/to/file.py:function (see `verifiers`)
    verifier_errors_file: str | None = None
    verifier_timeout: float = DEFAULT_TIMEOUT_S

    def scorer(self) -> Scorer:
        return make_scorer(self.reward_fn, self.verifier_errors_file, self.verifier_timeout)


@chz.chz
class ProblemFileBuilder(ScoredRowsBuilder):
    instruction: str = ANSWER_INSTRUCTION

    async def __call__(self) -> tuple[ProblemDataset, None]:
        dataset = ProblemDataset(
            self.rows(),
            self.renderer(),
            self.groups_per_batch,
            self.group_size,
            self.instruction,
            self.n_batches,
            self.seed,
            self.scorer(),
        )
        return dataset, None


class TicTacToeDataset(RLDataset):
    def __init__(self, games: list[dict], renderer: renderers.Renderer, groups_per_batch: int, group_size: int,
                 n_batches: int, seed: int):  # fmt: skip
        self.games, self.renderer, self.seed = games, renderer, seed
        self.groups_per_batch, self.group_size, self.n_batches = groups_per_batch, group_size, n_batches

    def get_batch(self, index: int) -> Sequence[EnvGroupBuilder]:
        from posttrain.pipeline.envs.games.tictactoe import TicTacToeGroupBuilder

        chosen = batch_indices(len(self.games), self.groups_per_batch, self.seed, index)
        return [TicTacToeGroupBuilder(self.games[i], self.renderer, self.group_size) for i in chosen]

    def __len__(self) -> int:
        return self.n_batches


@chz.chz
class GameFileBuilder(RowsFileBuilder):
    """Multi-turn games over the games we chose (`games`), in a seeded order so batch i is the same on resume:
    guess_number with the cookbook's own dataset and env classes, tic_tac_toe with `tictactoe`'s."""

    game: str = "guess_number"

    async def __call__(self) -> tuple[RLDataset, None]:
        from tinker_cookbook.recipes.multiplayer_rl.guess_number.env import GuessNumberDataset

        games, renderer = self.rows(), self.renderer()
        if self.game == "tic_tac_toe":
            dataset = TicTacToeDataset(
                games, renderer, self.groups_per_batch, self.group_size, self.n_batches, self.seed
            )
            return dataset, None
        targets = [int(p["target"]) for p in games]
        rng = random.Random(self.seed)
        answers = [
            targets[rng.randrange(len(targets))] for _ in range(self.n_batches * self.groups_per_batch)
        ]
        return GuessNumberDataset(
            answers=answers, renderer=renderer, batch_size=self.groups_per_batch, group_size=self.group_size
        ), None
