"""The one RL dataset of every environment, and the dataset builder the cookbook's `rl.train` calls.

Problems are written to a JSONL file in the run's log directory (a run can be reproduced from its logs); the
builder is a `chz` config, like every cookbook builder, and carries that path and the episode settings, not the
rows. Batch i holds `groups_per_batch` problems in a seeded order, epoch after epoch, so batch i is the same
after a resume; each problem is one RL group of `group_size` rollouts of the environment's own env.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import chz
from tinker_cookbook.rl.types import EnvGroupBuilder, RLDataset, RLDatasetBuilder

from posttrain.pipeline.envs import registry
from posttrain.pipeline.envs.base import EnvContext
from posttrain.pipeline.envs.spec import parse_env
from posttrain.pipeline.scoring.judge import GraderMode
from posttrain.pipeline.scoring.verifiers import DEFAULT_TIMEOUT_S
from posttrain.util import read_jsonl

if TYPE_CHECKING:
    import tinker
    from tinker_cookbook.completers import MessageCompleter

    from posttrain.pipeline.envs.base import Environment


def batch_indices(n_problems: int, groups_per_batch: int, seed: int, index: int) -> list[int]:
    """The problems of batch `index`: a seeded order, epoch after epoch, so batch i is the same on resume."""
    per_epoch = max(1, n_problems // groups_per_batch)
    epoch, offset = divmod(index, per_epoch)
    order = list(range(n_problems))
    random.Random(seed + epoch).shuffle(order)
    start = offset * groups_per_batch
    return [order[(start + k) % len(order)] for k in range(groups_per_batch)]


@dataclass(frozen=True)
class Batching:
    groups_per_batch: int
    group_size: int
    n_batches: int
    seed: int = 0


class EnvironmentDataset(RLDataset):
    def __init__(self, environment: Environment, problems: list[dict], ctx: EnvContext, batching: Batching):
        self.environment, self.problems, self.ctx, self.batching = environment, problems, ctx, batching

    def get_batch(self, index: int) -> Sequence[EnvGroupBuilder]:
        b = self.batching
        chosen = batch_indices(len(self.problems), b.groups_per_batch, b.seed, index)
        return [self.environment.group_builder(self.problems[i], self.ctx, b.group_size) for i in chosen]

    def __len__(self) -> int:
        return self.batching.n_batches


# A partner's reply ("yes"/"no"): the twenty questions recipe's answerer max_tokens.
PARTNER_MAX_TOKENS = 5


@chz.chz
class EpisodeSettings:
    """What an episode needs besides its problem: the environment, the renderer, the scorer, a judge."""

    env: str  # the env= spec
    model_name_for_tokenizer: str
    renderer_name: str
    reward_fn: str | None = None  # path/to/file.py:function (see `scoring.verifiers`)
    verifier_errors_file: str | None = None
    verifier_timeout: float = DEFAULT_TIMEOUT_S
    grader_model: str | None = None  # a judged environment's judge (`scoring.judge`)
    grader_renderer_name: str | None = None
    grader_mode: GraderMode = "probability"
    grader_concurrency: int = 64
    partner_model: str | None = None  # a game's other player (`envs.registry.Entry.partner`)
    partner_renderer_name: str | None = None

    async def context(self, service: tinker.ServiceClient | None, phase: str = "train") -> EnvContext:
        from tinker_cookbook import renderers
        from tinker_cookbook.tokenizer_utils import get_tokenizer

        from posttrain.pipeline.scoring.judge import make_judge
        from posttrain.pipeline.scoring.scorer import make_scorer

        renderer = renderers.get_renderer(
            self.renderer_name, tokenizer=get_tokenizer(self.model_name_for_tokenizer)
        )
        scorer = make_scorer(self.reward_fn, self.verifier_errors_file, self.verifier_timeout)
        judge = None
        if self.grader_model is not None and self.grader_renderer_name is not None and service is not None:
            judge = await make_judge(
                service,
                self.grader_model,
                self.grader_renderer_name,
                self.grader_mode,
                self.grader_concurrency,
            )
        partner = await self._partner(service)
        return EnvContext(parse_env(self.env), renderer, scorer, judge, partner, phase)

    async def _partner(self, service: tinker.ServiceClient | None) -> MessageCompleter | None:
        """The served base model (never this run's checkpoint), answering greedily: the same question gets the
        same answer whichever model asks it."""
        from tinker_cookbook import renderers
        from tinker_cookbook.completers import TinkerMessageCompleter
        from tinker_cookbook.tokenizer_utils import get_tokenizer

        if self.partner_model is None or self.partner_renderer_name is None or service is None:
            return None
        client = await service.create_sampling_client(base_model=self.partner_model)
        renderer = renderers.get_renderer(
            self.partner_renderer_name, tokenizer=get_tokenizer(self.partner_model)
        )
        return TinkerMessageCompleter(client, renderer, max_tokens=PARTNER_MAX_TOKENS, temperature=0.0)


@chz.chz
class EnvironmentDatasetBuilder(RLDatasetBuilder):
    """The dataset `rl.train` trains on: the problems in `rows_file`, batched."""

    rows_file: str
    episodes: EpisodeSettings
    groups_per_batch: int
    group_size: int
    n_batches: int
    seed: int = 0
    base_url: str | None = None  # a judge or a partner is served here
    # The held-out problems: the test set `rl.train` evaluates every eval_every steps (test/env/... metrics), one
    # rollout of each, in one batch.
    eval_rows_file: str | None = None

    async def __call__(self) -> tuple[EnvironmentDataset, EnvironmentDataset | None]:
        import tinker

        served = self.episodes.grader_model is not None or self.episodes.partner_model is not None
        service = tinker.ServiceClient(base_url=self.base_url) if served else None
        ctx = await self.episodes.context(service)
        environment = registry.environment(ctx.spec)
        batching = Batching(self.groups_per_batch, self.group_size, self.n_batches, self.seed)
        train = EnvironmentDataset(environment, read_jsonl(self.rows_file), ctx, batching)
        if self.eval_rows_file is None:
            return train, None
        held_out = read_jsonl(self.eval_rows_file)
        test = EnvironmentDataset(
            environment, held_out, ctx.for_phase("during training"), Batching(len(held_out), 1, 1)
        )
        return train, test
