"""The held-out evaluation of a preference-trained model (task=dpo, task=rlhf), the same on base and trained.

Per held-out pair: the length-normalised log-probs of the chosen and the rejected answer (preference accuracy,
mean margin). Pairs from a verifiable task (every held-out row carries an `answer`) are also answered by the
model (greedy with the default eval_temperature=0) and graded with pipeline/grading.py: the task accuracy.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import tinker

    from posttrain.pipeline.methods.base import RunContext

MARGIN_DEFINITION = "mean over held-out pairs of (chosen - rejected) mean log-prob per completion token"


class PreferenceEvaluation:
    def __init__(self, rows: Sequence[dict]):
        self.rows = list(rows)
        # Only when every held-out pair has one: a partial task accuracy would be over a different set.
        self.verifiable = bool(self.rows) and all(r.get("answer") for r in self.rows)
        self.margins: dict[str, float] = {}
        self.task_accuracy: dict[str, float] = {}

    def prepare(self, ctx: RunContext) -> None:
        """Render the held-out pairs the way DPO trains: the final assistant message, after the shared prompt."""
        from tinker_cookbook.renderers import TrainOnWhat
        from tinker_cookbook.supervised.data import conversation_to_datum

        self.ctx = ctx
        self.pairs = [
            tuple(
                conversation_to_datum(
                    [*row["prompt"], {"role": "assistant", "content": row[side]}],
                    ctx.renderer,
                    ctx.cfg.max_length,
                    TrainOnWhat.LAST_ASSISTANT_MESSAGE,
                )
                for side in ("chosen", "rejected")
            )
            for row in self.rows
        ]

    async def evaluate(self, client: tinker.SamplingClient, label: str) -> tuple[list[Any], float]:
        from posttrain.pipeline.evaluation.episodes import (
            SamplingSettings,
            evaluate_pair_answers,
            evaluate_preference,
        )

        cfg = self.ctx.cfg
        records, accuracy, margin = await evaluate_preference(
            client, self.pairs, self.rows, cfg.eval_concurrency, label
        )
        self.margins[label] = margin
        if self.verifiable:
            settings = SamplingSettings(cfg.max_tokens, cfg.eval_temperature, cfg.seed)
            task = await evaluate_pair_answers(
                client, records, self.rows, self.ctx.renderer, settings, cfg.eval_concurrency, label
            )
            self.task_accuracy[label] = task
            self.ctx.say(f"{label}: task accuracy {task:.1%} (answers sampled and graded)")
        return records, accuracy

    def summary_fields(self) -> dict[str, Any]:
        fields: dict[str, Any] = {
            "baseline_mean_margin": self.margins.get("base model"),
            "trained_mean_margin": self.margins.get("trained model"),
            "margin_definition": MARGIN_DEFINITION,
        }
        if self.verifiable:
            fields["baseline_task_accuracy"] = self.task_accuracy.get("base model")
            fields["trained_task_accuracy"] = self.task_accuracy.get("trained model")
            fields["task_accuracy_definition"] = (
                "fraction of held-out prompts whose sampled answer (eval_temperature, max_tokens) is graded "
                "correct against the pair's answer"
            )
        return fields

    def token_counts(self) -> list[int]:
        return [sum(d.model_input.length for d in pair) for pair in self.pairs]
