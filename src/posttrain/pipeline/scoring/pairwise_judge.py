"""A judge model as a pairwise preference model (`task=pairwise_rl preference_model=judge`): which of two answers
to the same conversation is better.

The judge reads the conversation and the two answers, labelled A and B, and is asked "Which answer is better?
Answer with A or B."; the verdict is P(A) / (P(A) + P(B)) for its reply's first token, read with
`compute_logprobs` the way the rubric judge reads P(Yes) (`scoring.judge`: the same served base model, renderer
and concurrency bound, no sampling). A continuous verdict is what lets a small judge order the answers of one
group at all. One call judges one order: callers judge every pair both ways (the cookbook's
`ALL_PAIRS_BOTH_WAYS` in training, both orders in the evaluation), so the judge's bias for a position cancels.
Verdicts are judgements, not verified facts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from posttrain.pipeline.scoring.judge import Judge, Messages, make_judge
from posttrain.util import short_error

if TYPE_CHECKING:
    import tinker

A_OR_B_INSTRUCTION = "Answer with A or B."
# The prompt's own words around the conversation and the two answers, in tokens (about 70 with the SmolLM2
# tokenizer), for the plan.
PROMPT_OVERHEAD = 80


@dataclass(frozen=True)
class PairVerdict:
    score: float  # P(A) / (P(A) + P(B)): 1 when A is preferred, 0 when B is; 0.5 when the judge failed
    verdict: str  # the judge's reading, "P(A)=0.41 P(B)=0.33"
    error: str | None = None


def comparison_prompt(conversation: Messages, a: str, b: str) -> Messages:
    """The judge's prompt, in the cookbook rubric grader's layout (`Rubric.get_grader_prompt`): its roles and
    tags, one user turn, the instruction last."""
    context = "\n\n".join(
        f"{'Chatbot' if m['role'] == 'assistant' else 'Human'}: {m['content']}" for m in conversation
    )
    lines = [
        "I will show you a conversation context and two candidate chatbot replies to it, labelled A and B.",
        "Please decide which reply is better: more helpful, correct and appropriate.",
        "",
        "<context>",
        context or "(No prior context)",
        "</context>",
        "",
        "<reply_A>",
        f"Chatbot: {a}",
        "</reply_A>",
        "",
        "<reply_B>",
        f"Chatbot: {b}",
        "</reply_B>",
        "",
        f"Which reply is better? {A_OR_B_INSTRUCTION}",
    ]
    return [{"role": "user", "content": "\n".join(lines)}]


class PairwiseJudge:
    """Compares two answers with a served judge (a `scoring.judge.Judge`: its client, renderer and semaphore)."""

    def __init__(self, judge: Judge):
        self.judge = judge
        self.model = judge.model
        self._a, self._b = judge.first_token("A"), judge.first_token("B")

    async def compare(self, conversation: Messages, a: str, b: str) -> PairVerdict:
        prompt = self.judge.renderer.build_generation_prompt(comparison_prompt(conversation, a, b))
        try:
            p_a, p_b = await self.judge.odds(prompt, self._a, self._b)
        except Exception as exc:  # noqa: BLE001 - a failed judge call is a tie and is reported, not fatal
            return PairVerdict(0.5, "", error=f"judge: {short_error(exc)}")
        # Neither letter at all: no preference either way.
        score = p_a / (p_a + p_b) if p_a + p_b > 0 else 0.5
        return PairVerdict(score, f"P(A)={p_a:.4g} P(B)={p_b:.4g}")


async def make_pairwise_judge(
    service: tinker.ServiceClient, model: str, renderer_name: str, concurrency: int
) -> PairwiseJudge:
    """The served base model `model` (never a checkpoint of this run) as a pairwise judge."""
    return PairwiseJudge(await make_judge(service, model, renderer_name, "probability", concurrency))
