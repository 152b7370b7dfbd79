"""On-policy distillation: the cookbook's `distillation.train_on_policy` (the student samples, each teacher scores the
student's tokens, the per-token reverse KL is the negative advantage), one `DistillationDatasetConfig` per teacher
as its multi-teacher recipe does: every step takes a share of batch_size prompts from each teacher's dataset."""

from __future__ import annotations

import math
import random
from collections.abc import Coroutine, Sequence
from functools import partial
from typing import Any

import chz
from tinker_cookbook import renderers
from tinker_cookbook.distillation import train_on_policy
from tinker_cookbook.distillation.datasets import DistillationDatasetConfig, PromptOnlyEnv, TeacherConfig
from tinker_cookbook.rl.problem_env import ProblemGroupBuilder
from tinker_cookbook.rl.types import EnvGroupBuilder, RLDataset, RLDatasetBuilder
from tinker_cookbook.tokenizer_utils import get_tokenizer

from posttrain.pipeline.methods.base import RunContext
from posttrain.pipeline.methods.distillation.prompts import Messages, Share
from posttrain.pipeline.methods.distillation.teachers import Teacher
from posttrain.util import read_jsonl, write_jsonl

# The on-policy reverse-KL advantage weight (the cookbook recipe's default).
ON_POLICY_KL_COEF = 1.0


class PromptListDataset(RLDataset):
    """The cookbook's reward-free `PromptOnlyEnv` over our prompts (earlier turns become its conversation
    prefix), `groups_per_batch` prompts per step."""

    def __init__(
        self, prompts: list[Messages], renderer: renderers.Renderer, groups: tuple[int, int], tag: str
    ):
        self.prompts, self.renderer = prompts, renderer
        self.groups_per_batch, self.group_size = groups
        self.tag = tag  # the env/<tag>/... metrics' name

    def get_batch(self, index: int) -> Sequence[EnvGroupBuilder]:
        batch = self.prompts[index * self.groups_per_batch : (index + 1) * self.groups_per_batch]
        return [
            ProblemGroupBuilder(
                env_thunk=partial(
                    PromptOnlyEnv, p[-1]["content"], self.renderer, convo_prefix=p[:-1] or None
                ),
                num_envs=self.group_size,
                dataset_name=self.tag,
            )
            for p in batch
        ]

    def __len__(self) -> int:
        return math.ceil(len(self.prompts) / self.groups_per_batch)


@chz.chz
class PromptFileBuilder(RLDatasetBuilder):
    """One teacher's training prompts (written to the run's logs), cycled and reshuffled to fill n_batches."""

    rows_file: str
    model_name_for_tokenizer: str
    renderer_name: str
    groups_per_batch: int
    group_size: int
    n_batches: int
    seed: int = 0
    dataset_name: str = "prompts"

    async def __call__(self) -> tuple[PromptListDataset, None]:
        prompts = [r["prompt"] for r in read_jsonl(self.rows_file)]
        rng = random.Random(self.seed)
        ordered: list[Messages] = []
        while len(ordered) < self.n_batches * self.groups_per_batch:
            ordered += rng.sample(prompts, len(prompts))
        renderer = renderers.get_renderer(
            self.renderer_name, tokenizer=get_tokenizer(self.model_name_for_tokenizer)
        )
        return PromptListDataset(
            ordered, renderer, (self.groups_per_batch, self.group_size), self.dataset_name
        ), None


def train(
    ctx: RunContext, teachers: Sequence[tuple[Share, Teacher, int]], n_batches: int
) -> Coroutine[Any, Any, Any]:
    """The cookbook's on-policy loop over every (share, its resolved teacher, its prompts per step)."""
    cfg = ctx.cfg
    several = len(teachers) > 1
    dataset_configs = []
    for k, (share, teacher, per_step) in enumerate(teachers):
        prompts_file = ctx.data_dir / (f"train_prompts_{k}.jsonl" if several else "train_prompts.jsonl")
        write_jsonl(prompts_file, ({"prompt": p} for p in share.prompts.train))
        builder = PromptFileBuilder(
            rows_file=str(prompts_file),
            model_name_for_tokenizer=cfg.model_name,
            renderer_name=ctx.renderer_name,
            groups_per_batch=per_step,
            group_size=cfg.group_size,
            n_batches=n_batches,
            seed=cfg.seed + k,
            dataset_name=f"teacher_{k}" if several else "prompts",
        )
        teacher_config = TeacherConfig(base_model=teacher.base_model, load_checkpoint_path=teacher.checkpoint)
        dataset_configs.append(
            DistillationDatasetConfig(
                dataset_builder=builder, teacher_config=teacher_config, groups_per_batch=per_step
            )
        )
    config = train_on_policy.Config(
        **ctx.loop_settings(),
        recipe_name="posttrain_distillation_on_policy",
        dataset_configs=dataset_configs,
        max_tokens=cfg.max_tokens,
        temperature=cfg.temperature,
        kl_penalty_coef=ON_POLICY_KL_COEF if cfg.kl_penalty_coef is None else cfg.kl_penalty_coef,
        kl_discount_factor=cfg.kl_discount_factor,
        num_substeps=cfg.num_substeps,
        loss_fn=cfg.loss_fn,
        max_steps=n_batches,
    )
    return train_on_policy.main(config)
