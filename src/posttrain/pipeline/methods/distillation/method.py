"""The distillation method: prompts (`prompts`), teachers (`teachers`), off- or on-policy training
(`off_policy`, `on_policy`), the held-out measures (`held_out`) and what summary.json says (`summary`)."""

from __future__ import annotations

import math
from collections.abc import Coroutine, Mapping
from typing import Any, ClassVar

import tinker

from posttrain.config.renderers import resolve_renderer
from posttrain.pipeline.data import LoadedData
from posttrain.pipeline.data.sources import teacher_models
from posttrain.pipeline.methods.base import Method, RunContext
from posttrain.pipeline.methods.distillation import off_policy, on_policy, summary
from posttrain.pipeline.methods.distillation.held_out import HeldOut
from posttrain.pipeline.methods.distillation.prompts import Share, load_prompts, pooled, split_evenly
from posttrain.pipeline.methods.distillation.settings import DistillationConfig
from posttrain.pipeline.methods.distillation.teachers import (
    TeacherPool,
    check_same_tokenizer,
    check_teacher_found,
)
from posttrain.pipeline.setup.plan import TokenBudget
from posttrain.util import write_jsonl


class Distillation(Method):
    name: ClassVar[str] = "distillation"
    metric: ClassVar = "nll"
    score_label: str = "NLL of the teacher's completions"

    def __init__(self, cfg: DistillationConfig, data: LoadedData | None):
        assert cfg.teacher_model is not None  # the method's own settings check guarantees it
        self.mode = cfg.distillation_mode or "off_policy"
        self.teacher_model = cfg.teacher_model
        # One dataset per teacher (config.check_teachers), in the same order.
        datasets = [data, *data.others] if data is not None else [None]
        self.shares = tuple(
            Share(name, load_prompts(cfg, d, self.name))
            for name, d in zip(teacher_models(cfg), datasets, strict=True)
        )
        self.prompts = pooled(self.shares)
        # A named teacher must be served next to the student; a checkpoint's base model is looked up later.
        named = [s.teacher_model for s in self.shares if not s.teacher_model.startswith("tinker://")]
        self.extra_models = [t for t in named if t != cfg.model_name]
        for teacher in named:
            check_teacher_found(teacher)
            # An explicit renderer_name is the chat format of all; otherwise each model's recommended one.
            student_renderer = resolve_renderer(cfg.model_name, cfg.renderer_name)[0]
            teacher_renderer = cfg.renderer_name or resolve_renderer(teacher, None)[0]
            check_same_tokenizer(cfg.model_name, teacher, student_renderer, teacher_renderer)
        self.task_accuracy: dict[str, float] = {}
        self.trace_counts: dict[str, list[int]] = {}

    def prepare(self, ctx: RunContext) -> None:
        self.ctx = ctx
        cfg = ctx.cfg
        self.pool = TeacherPool(ctx, self.shares)
        self.held_out = HeldOut(self.pool)
        who = (
            f"{len(self.shares)} teachers, each on its own dataset"
            if self.pool.several
            else f"teacher {self.teacher_model}"
        )
        ctx.say(f"distillation: {self.mode}, {who}")
        if self.mode == "on_policy":
            self.total_steps = (
                cfg.max_steps or math.ceil(len(self.prompts.train) / cfg.batch_size) * cfg.num_epochs
            )
        else:  # the supervised loop over the traces (a prompt the teacher leaves unanswered drops out)
            self.total_steps = off_policy.steps(len(self.prompts.train), cfg)
        # on_policy: each step's prompts from each teacher's dataset (the recipe's groups_per_batch).
        self.per_step = split_evenly(cfg.batch_size, len(self.shares))
        for k, share in enumerate(self.shares if self.pool.several else ()):
            per_step = f", {self.per_step[k]} prompts per step" if self.mode == "on_policy" else ""
            ctx.say(
                f"distillation: teacher {k} {share.teacher_model}: {share.prompts.source.get('source')}, "
                f"{len(share.prompts.train)} training and {len(share.prompts.eval)} held-out prompts{per_step}"
            )

    async def evaluate(self, client: tinker.SamplingClient, label: str) -> tuple[list[Any], float]:
        rows, nll = await self.held_out.nll(client, label)
        self.trace_counts["teacher_eval.jsonl"] = self.held_out.traces.counts if self.held_out.traces else []
        if self.mode == "on_policy":
            await self.held_out.reverse_kl(client, label)
        for k, share in enumerate(self.shares if self.pool.several else ()):
            kl = (
                f", reverse KL {self.held_out.kl_by_teacher[label][k]:.4f}"
                if self.mode == "on_policy"
                else ""
            )
            nll_k = self.held_out.nll_by_teacher[label][k]
            self.ctx.say(f"{label}: teacher {k} {share.teacher_model}: held-out NLL {nll_k:.4f}{kl}")
        if self.prompts.eval_problems:
            await self._task_accuracy(client, label)
        return rows, nll

    async def _task_accuracy(self, client: tinker.SamplingClient, label: str) -> None:
        """Where the held-out prompts can be graded: the student's answers, sampled as RL evaluation does."""
        from posttrain.pipeline.envs import registry
        from posttrain.pipeline.envs.base import EnvContext
        from posttrain.pipeline.envs.spec import EnvSpec
        from posttrain.pipeline.evaluation.common import SamplingSettings
        from posttrain.pipeline.evaluation.episodes import HeldOut as Problems
        from posttrain.pipeline.evaluation.episodes import evaluate_episodes
        from posttrain.pipeline.scoring.scorer import Scorer

        cfg = self.ctx.cfg
        spec = EnvSpec("math")
        ctx = EnvContext(spec, self.ctx.renderer, Scorer(), phase=label)
        problems = [{**p, "grader": "math"} for p in self.prompts.eval_problems]
        settings = SamplingSettings(cfg.max_tokens, cfg.eval_temperature, cfg.seed, cfg.eval_concurrency)
        records, accuracy = await evaluate_episodes(
            client, Problems(registry.environment(spec), problems, ctx), settings
        )
        self.task_accuracy[label] = accuracy
        write_jsonl(self.ctx.data_dir / f"task_{label.split()[0]}.jsonl", (r.to_dict() for r in records))
        self.ctx.say(f"{label}: task accuracy {accuracy:.1%} on {len(problems)} gradable held-out prompts")

    def train(self) -> Coroutine[Any, Any, Any]:
        return self._off_policy() if self.mode == "off_policy" else self._on_policy()

    async def _off_policy(self) -> None:
        await self.held_out.sample()
        traces = await self.pool.answers("train", self.ctx.cfg.seed, "teacher: training prompts")
        self.trace_counts["teacher_train.jsonl"] = traces.counts
        await off_policy.train(self.ctx, self.name)

    async def _on_policy(self) -> None:
        cfg = self.ctx.cfg
        n_batches = cfg.max_steps or math.ceil(len(self.prompts.train) / cfg.batch_size) * cfg.num_epochs
        teachers = [
            (share, (await self.pool.get(k))[0], self.per_step[k]) for k, share in enumerate(self.shares)
        ]
        await on_policy.train(self.ctx, teachers, n_batches)

    def token_budget(self) -> TokenBudget:
        return summary.token_budget(self)

    def score_text(self, value: float) -> str:
        held_out = self.held_out.traces.rows if self.held_out.traces else []
        return f"held-out NLL of the teacher's completions {value:.4f} on {len(held_out)} prompts"

    def describe(self) -> tuple[Mapping[str, Any], Mapping[str, int], Mapping[str, Any]]:
        return summary.describe(self)
