"""LLM-judged rubrics: a grader model scores a response against each rubric item; the reward is the weighted
mean of the item scores.

The grader prompt is the cookbook's (`tinker_cookbook.recipes.rubric.data.Rubric.get_grader_prompt`: the
conversation as context, the response to grade, the criterion). Two ways to read the grader's answer:

- "probability" (default): the prompt ends "Answer with Yes or No."; the score is P(Yes) / (P(Yes) + P(No)) for
  the grader's first answer token, read with `compute_logprobs` (no sampling). It is deterministic and graded
  rather than 0/1, which is what makes a small grader usable at all: RL compares the responses of one group,
  and a continuous score orders them where a sampled verdict would tie. The grader's reply must begin with its
  answer (a non-thinking renderer).
- "sampled": the cookbook's own format: the grader answers greedily with `<score>x</score>`, parsed by
  `Rubric.extract_score` (0 when there is none), clamped to [0, 1].

The grader is always the served *base* model it names (never a checkpoint of this run), so training cannot move
the judge. Its calls are concurrent, bounded by a semaphore. Scores are judgements, not verified facts: results
label them so (`score_kind: "judged"`).

The cookbook's `RubricGradedEnv` is not reused as is: it takes a sampled-text grader and an unweighted mean,
and keeps the verdicts only in its log tree; `RubricEnv` mirrors its reward (score + format penalty).
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial

import chz
import tinker
from tinker_cookbook import renderers
from tinker_cookbook.recipes.rubric.data import Rubric
from tinker_cookbook.rl.problem_env import ProblemGroupBuilder
from tinker_cookbook.rl.types import (
    Action,
    ActionExtra,
    Env,
    EnvGroupBuilder,
    RLDataset,
    StepResult,
)
from tinker_cookbook.tokenizer_utils import get_tokenizer

from posttrain.config import GraderMode
from posttrain.pipeline.envs.dataset import RowsFileBuilder, batch_indices
from posttrain.util import short_error

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
    if mode == "sampled":
        rubric = Rubric(criterion)
    else:
        rubric = Rubric(criterion, grader_output_format_instruction=YES_NO_INSTRUCTION)
    return rubric.get_grader_prompt([*conversation, {"role": "assistant", "content": response}])


class Grader:
    """Judges responses with one served model; at most `concurrency` grader requests at a time."""

    def __init__(
        self,
        client: tinker.SamplingClient,
        renderer: renderers.Renderer,
        mode: GraderMode,
        concurrency: int,
    ):
        self.client = client
        self.renderer = renderer
        self.mode = mode
        self._slots = asyncio.Semaphore(max(1, concurrency))
        tokenizer = renderer.tokenizer
        # The first token of each answer word (what the grader's reply starts with).
        self._yes = tokenizer.encode("Yes", add_special_tokens=False)[0]
        self._no = tokenizer.encode("No", add_special_tokens=False)[0]

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

    async def _probability(self, prompt: tinker.ModelInput) -> tuple[float, str]:
        yes, no = await asyncio.gather(
            self.client.compute_logprobs_async(prompt.append_int(self._yes)),
            self.client.compute_logprobs_async(prompt.append_int(self._no)),
        )
        p_yes, p_no = (math.exp(lp[-1]) if lp[-1] is not None else 0.0 for lp in (yes, no))
        score = p_yes / (p_yes + p_no) if p_yes + p_no > 0 else 0.0
        return score, f"P(Yes)={p_yes:.4g} P(No)={p_no:.4g}"

    async def _sampled(self, prompt: tinker.ModelInput, criterion: str) -> tuple[float, str]:
        params = tinker.SamplingParams(
            max_tokens=SAMPLED_MAX_TOKENS, temperature=0.0, stop=self.renderer.get_stop_sequences()
        )
        out = await self.client.sample_async(prompt, num_samples=1, sampling_params=params)
        text = renderers.get_text_content(self.renderer.parse_response(out.sequences[0].tokens)[0])
        return min(1.0, max(0.0, Rubric(criterion).extract_score(text))), text


async def make_grader(
    service: tinker.ServiceClient, model: str, renderer_name: str, mode: GraderMode, concurrency: int
) -> Grader:
    # base_model only, never a model_path: the grader is the untrained model it names.
    client = await service.create_sampling_client_async(base_model=model)
    renderer = renderers.get_renderer(renderer_name, tokenizer=get_tokenizer(model))
    return Grader(client, renderer, mode, concurrency)


class RubricEnv(Env):
    """One conversation: the policy writes the next reply, the grader scores it against every item. The reward
    is the weighted mean item score minus the cookbook's format penalty (a reply cut off by max_tokens)."""

    def __init__(self, row: dict, renderer: renderers.Renderer, grader: Grader, format_coef: float = 0.1):
        self.row = row
        self.renderer = renderer
        self.grader = grader
        self.format_coef = format_coef

    async def initial_observation(self) -> tuple[tinker.ModelInput, renderers.StopCondition]:
        return self.renderer.build_generation_prompt(self.row["messages"]), self.renderer.get_stop_sequences()

    async def step(self, action: Action, *, extra: ActionExtra | None = None) -> StepResult:
        message, termination = self.renderer.parse_response(action)
        response = renderers.get_text_content(message)
        verdicts = await self.grader.judge(self.row["messages"], response, self.row["rubric"])
        score = weighted_score(verdicts)
        well_formed = float(termination.is_stop_sequence)
        return StepResult(
            reward=self.format_coef * (well_formed - 1) + score,
            episode_done=True,
            next_observation=tinker.ModelInput.empty(),
            next_stop_condition=self.renderer.get_stop_sequences(),
            metrics={
                "format": well_formed,
                "rubric_score": score,
                "grader_error": float(any(v.error for v in verdicts)),
            },
        )


class RubricDataset(RLDataset):
    def __init__(
        self,
        rows: list[dict],
        renderer: renderers.Renderer,
        grader: Grader,
        groups_per_batch: int,
        group_size: int,
        n_batches: int,
        seed: int,
    ):
        self.rows, self.renderer, self.grader = rows, renderer, grader
        self.groups_per_batch, self.group_size = groups_per_batch, group_size
        self.n_batches, self.seed = n_batches, seed

    def get_batch(self, index: int) -> Sequence[EnvGroupBuilder]:
        return [
            ProblemGroupBuilder(
                env_thunk=partial(RubricEnv, self.rows[i], self.renderer, self.grader),
                num_envs=self.group_size,
                dataset_name="train",
            )
            for i in batch_indices(len(self.rows), self.groups_per_batch, self.seed, index)
        ]

    def __len__(self) -> int:
        return self.n_batches


@chz.chz
class RubricFileBuilder(RowsFileBuilder):
    """The rubric rows (written to the run's logs) and the grader, for the cookbook's `rl.train`."""

    grader_model: str = ""
    grader_renderer_name: str = ""
    grader_mode: GraderMode = "probability"
    grader_concurrency: int = 64
    base_url: str | None = None

    async def __call__(self) -> tuple[RubricDataset, None]:
        renderer = self.renderer()
        grader = await make_grader(
            tinker.ServiceClient(base_url=self.base_url),
            self.grader_model,
            self.grader_renderer_name,
            self.grader_mode,
            self.grader_concurrency,
        )
        dataset = RubricDataset(
            self.rows(), renderer, grader, self.groups_per_batch, self.group_size, self.n_batches, self.seed
        )
        return dataset, None
