"""task=pairwise_rl's judge (`preference_model=judge`, `grader_model=`): task=rubric's `Judging` (a base model the
backend serves by name, never trained; its renderer, thinking switched off; the judged-not-verified summary),
with the tokens of pairwise comparisons and the pairwise reading (`scoring.pairwise_judge`)."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, ClassVar

from posttrain.pipeline.methods.rubric import Judging
from posttrain.pipeline.scoring.pairwise_judge import A_OR_B_INSTRUCTION, PROMPT_OVERHEAD
from posttrain.pipeline.setup.plan import TokenBudget

SCORING = (
    f'the judge reads the conversation and two answers labelled A and B ("{A_OR_B_INSTRUCTION}"); a comparison '
    "scores P(A) / (P(A) + P(B)) at the judge's first answer token, and every pair is judged in both orders, so "
    "the judge's bias for a position cancels"
)


@dataclass
class PairwiseJudging(Judging):
    method: ClassVar[str] = "pairwise_rl"

    def add_comparison_tokens(
        self, budget: TokenBudget, comparisons: int, prompt: float, answer: int
    ) -> TokenBudget:
        """Each comparison reads the conversation and both answers twice (once ending in A, once in B) and
        samples nothing."""
        per_comparison = 2 * (prompt + 2 * answer + PROMPT_OVERHEAD + 1)
        note = f"grader {self.model}: {comparisons:,} comparisons (every pair both ways), probability scoring"
        return replace(
            budget, prefill=round(budget.prefill + comparisons * per_comparison), notes=[*budget.notes, note]
        )

    def summary(self) -> dict[str, Any]:
        return {**super().summary(), "grader_scoring": SCORING}
