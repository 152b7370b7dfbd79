"""What distillation is evaluated on: the teachers' answers to the held-out prompts (sampled once, before the base
model is evaluated), the student's NLL of them (per teacher too), its reverse KL to the teachers (on-policy), and,
where the held-out prompts can be graded, its task accuracy."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import tinker
from tinker_cookbook.renderers import TrainOnWhat
from tinker_cookbook.supervised.data import conversation_to_datum

from posttrain.pipeline.envs.base import EVAL_SEED_OFFSET
from posttrain.pipeline.evaluation.common import SamplingSettings
from posttrain.pipeline.evaluation.nll import evaluate_nll
from posttrain.pipeline.methods.distillation.teachers import TeacherPool, Traces, per_token, reverse_kl


class HeldOut:
    def __init__(self, pool: TeacherPool):
        self.pool, self.ctx = pool, pool.ctx
        self.traces: Traces | None = None
        self.datums: list[tinker.Datum] = []
        self.nll_by_teacher: dict[str, list[float]] = {}
        self.kl: dict[str, float] = {}
        self.kl_by_teacher: dict[str, list[float]] = {}

    async def sample(self) -> Traces:
        """The teachers' held-out answers, sampled on first use (other seeds than the training traces)."""
        if self.traces is None:
            await self.pool.check_all()
            seed = self.ctx.cfg.seed + EVAL_SEED_OFFSET
            self.traces = await self.pool.answers("eval", seed, "teacher: held-out")
            max_length = self.ctx.cfg.max_length
            self.datums = [
                conversation_to_datum(
                    r["messages"], self.ctx.renderer, max_length, TrainOnWhat.LAST_ASSISTANT_MESSAGE
                )
                for r in self.traces.rows
            ]
        return self.traces

    async def nll(self, client: tinker.SamplingClient, label: str) -> tuple[list[Any], float]:
        traces = await self.sample()
        rows, nll = await evaluate_nll(client, self.datums, traces.rows, self.ctx.cfg.eval_concurrency, label)
        if self.pool.several:
            for row, k in zip(rows, traces.owners, strict=True):
                row.teacher = self.pool.shares[k].teacher_model
            self.nll_by_teacher[label] = self._by_teacher(rows)
        return rows, nll

    async def reverse_kl(self, client: tinker.SamplingClient, label: str) -> None:
        """Per-token KL(student || teacher) on each teacher's held-out prompts, pooled over teachers."""
        cfg = self.ctx.cfg
        parts, offset = [], 0
        for k, share in enumerate(self.pool.shares):
            _, teacher = await self.pool.get(k)
            settings = SamplingSettings(cfg.max_tokens, 1.0, cfg.seed + offset, cfg.eval_concurrency)
            desc = f"{label} (teacher {k})" if self.pool.several else label
            parts.append(
                await reverse_kl((client, teacher), self.ctx.renderer, share.prompts.eval, settings, desc)
            )
            offset += len(share.prompts.eval)
        self.kl[label] = per_token(sum(t for t, _ in parts), sum(n for _, n in parts))
        self.kl_by_teacher[label] = [per_token(t, n) for t, n in parts]

    def _by_teacher(self, rows: Sequence[Any]) -> list[float]:
        """Each teacher's token-weighted mean NLL on its own held-out rows (as evaluate_nll pools them all)."""
        assert self.traces is not None
        totals, tokens = [0.0] * len(self.pool.shares), [0.0] * len(self.pool.shares)
        for row, datum, k in zip(rows, self.datums, self.traces.owners, strict=True):
            if row.nll is not None:
                weight = float(datum.loss_fn_inputs["weights"].to_numpy().sum())
                totals[k] += row.nll * weight
                tokens[k] += weight
        return [per_token(t, n) for t, n in zip(totals, tokens, strict=True)]

    def measured(self, values: dict[str, list[float]], label: str, k: int) -> float | None:
        """None: not measured (a resumed run keeps the base rows, not the measures) or nothing scored."""
        value = values[label][k] if label in values else None
        return value if value is not None and math.isfinite(value) else None
