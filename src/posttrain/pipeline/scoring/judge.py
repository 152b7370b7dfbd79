"""LLM-judged rubric items: a judge model scores a response against each criterion; the reward is the weighted mean.

The grader prompt is the cookbook's (`tinker_cookbook.recipes.rubric.data.Rubric.get_grader_prompt`: the
conversation as context, the response to grade, the criterion). Two ways to read the judge's answer:

- "probability" (default): the prompt ends "Answer with Yes or No."; the score is P(Yes) / (P(Yes) + P(No)) for
  the judge's first answer token, read with `compute_logprobs` (no sampling). It is deterministic and graded
  rather than 0/1, which is what makes a small judge usable at all: RL compares the responses of one group,
  and a continuous score orders them where a sampled verdict would tie. The judge's reply must begin with its
  answer (a non-thinking renderer).
- "sampled": the cookbook's own format: the judge answers greedily with `<score>x</score>`, parsed by
  `Rubric.extract_score` (0 when there is none), clamped to [0, 1].

The judge is always the served *base* model it names (never a checkpoint of this run), so training cannot move
it. Its calls are concurrent, bounded by a semaphore. Scores are judgements, not verified facts.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from posttrain.util import short_error

if TYPE_CHECKING:
    import tinker
    from tinker_cookbook import renderers

GraderMode = Literal["probability", "sampled"]
YES_NO_INSTRUCTION = "Answer with Yes or No."
# Sampled verdicts: enough for "<score>0.8</score>" after a short justification.
SAMPLED_MAX_TOKENS = 128

Messages = list[dict[str, str]]


@dataclass(frozen=True)
class ItemVerdict:
    criterion: str
    weight: float
    score: float  # in [0, 1]
    verdict: str  # the grader's raw answer ("P(Yes)=0.71 P(No)=0.20", or its sampled text)
    error: str | None = None

    def as_dict(self) -> dict:
        d = {"criterion": self.criterion, "weight": self.weight, "score": self.score, "verdict": self.verdict}
        return d | ({"error": self.error} if self.error else {})


def weighted_score(verdicts: Sequence[ItemVerdict]) -> float:
    total = sum(v.weight for v in verdicts)
    return sum(v.weight * v.score for v in verdicts) / total if total else 0.0


def rubric_text(items: Sequence[dict]) -> str:
    """The rubric in one line, for result rows: 'criterion; criterion (weight 2)'."""
    return "; ".join(
        i["criterion"] + (f" (weight {i['weight']:g})" if i.get("weight", 1.0) != 1.0 else "") for i in items
    )


def grader_prompt(conversation: Messages, response: str, criterion: str, mode: GraderMode) -> Messages:
    from tinker_cookbook.recipes.rubric.data import Rubric

    if mode == "sampled":
        rubric = Rubric(criterion)
    else:
        rubric = Rubric(criterion, grader_output_format_instruction=YES_NO_INSTRUCTION)
    return rubric.get_grader_prompt([*conversation, {"role": "assistant", "content": response}])


class Judge:
    """Judges responses with one served model; at most `concurrency` grader requests at a time."""

    def __init__(
        self,
        client: tinker.SamplingClient,
        renderer: renderers.Renderer,
        mode: GraderMode,
        concurrency: int,
        model: str = "",
    ):
        self.client = client
        self.model = model  # the judge's name, for the rows
        self.renderer = renderer
        self.mode = mode
        self._slots = asyncio.Semaphore(max(1, concurrency))
        self._yes, self._no = self.first_token("Yes"), self.first_token("No")

    def first_token(self, word: str) -> int:
        """The first token of an answer word (what the grader's reply starts with)."""
        return self.renderer.tokenizer.encode(word, add_special_tokens=False)[0]

    async def odds(self, prompt: tinker.ModelInput, first: int, second: int) -> tuple[float, float]:
        """P(first) and P(second) as the reply's first token, within the concurrency bound (a pairwise judge's
        A/B, `scoring.pairwise_judge`)."""
        async with self._slots:
            return await self._odds(prompt, first, second)

    async def judge(self, conversation: Messages, response: str, items: Sequence[dict]) -> list[ItemVerdict]:
        return list(await asyncio.gather(*(self._judge_item(conversation, response, i) for i in items)))

    async def _judge_item(self, conversation: Messages, response: str, item: dict) -> ItemVerdict:
        criterion, weight = item["criterion"], float(item.get("weight", 1.0))
        prompt = self.renderer.build_generation_prompt(
            grader_prompt(conversation, response, criterion, self.mode)
        )
        try:
            async with self._slots:
                if self.mode == "probability":
                    score, verdict = await self._probability(prompt)
                else:
                    score, verdict = await self._sampled(prompt, criterion)
        except Exception as exc:  # noqa: BLE001 - a failed grader call scores 0 and is reported, not fatal
            return ItemVerdict(criterion, weight, 0.0, "", error=f"grader: {short_error(exc)}")
        return ItemVerdict(criterion, weight, score, verdict)

    async def _odds(self, prompt: tinker.ModelInput, first: int, second: int) -> tuple[float, float]:
        one, other = await asyncio.gather(
            self.client.compute_logprobs(prompt.append_int(first)),
            self.client.compute_logprobs(prompt.append_int(second)),
        )
        p_one, p_other = (math.exp(lp[-1]) if lp[-1] is not None else 0.0 for lp in (one, other))
        return p_one, p_other

    async def _probability(self, prompt: tinker.ModelInput) -> tuple[float, str]:
        p_yes, p_no = await self._odds(prompt, self._yes, self._no)
        score = p_yes / (p_yes + p_no) if p_yes + p_no > 0 else 0.0
        return score, f"P(Yes)={p_yes:.4g} P(No)={p_no:.4g}"

    async def _sampled(self, prompt: tinker.ModelInput, criterion: str) -> tuple[float, str]:
        import tinker
        from tinker_cookbook import renderers
        from tinker_cookbook.recipes.rubric.data import Rubric

        params = tinker.SamplingParams(
            max_tokens=SAMPLED_MAX_TOKENS, temperature=0.0, stop=self.renderer.get_stop_sequences()
        )
        out = await self.client.sample(prompt, num_samples=1, sampling_params=params)
        text = renderers.get_text_content(self.renderer.parse_response(out.sequences[0].tokens)[0])
        return min(1.0, max(0.0, Rubric(criterion).extract_score(text))), text


async def make_judge(
    service: tinker.ServiceClient, model: str, renderer_name: str, mode: GraderMode, concurrency: int
) -> Judge:
    from tinker_cookbook import renderers
    from tinker_cookbook.tokenizer_utils import get_tokenizer

    # base_model only, never a model_path: the grader is the untrained model it names.
    client = await service.create_sampling_client(base_model=model)
    renderer = renderers.get_renderer(renderer_name, tokenizer=get_tokenizer(model))
    return Judge(client, renderer, mode, concurrency, model)
