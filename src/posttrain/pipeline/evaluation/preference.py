"""The held-out evaluation of a preference-trained model (task=dpo, task=rlhf), the same on base and trained.

Per held-out pair: the length-normalised log-probs of the chosen and the rejected answer (preference accuracy,
mean margin). Pairs from a verifiable task (every held-out row carries an `answer`) are also answered by the
model (greedy with the default eval_temperature=0) and graded with the math grader: the task accuracy.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from posttrain.pipeline.evaluation.common import SamplingSettings, bounded_gather
from posttrain.pipeline.results import PreferenceExample
from posttrain.util import short_error

if TYPE_CHECKING:
    import tinker
    from tinker_cookbook import renderers

MARGIN_DEFINITION = "mean over held-out pairs of (chosen - rejected) mean log-prob per completion token"


class PreferenceEvaluation:
    def __init__(self, rows: Sequence[dict]):
        self.rows = list(rows)
        # Only when every held-out pair has one: a partial task accuracy would be over a different set.
        self.verifiable = bool(self.rows) and all(r.get("answer") for r in self.rows)
        self.margins: dict[str, float] = {}
        self.task_accuracy: dict[str, float] = {}

    def prepare(
        self,
        renderer: renderers.Renderer,
        max_length: int,
        settings: SamplingSettings,
        say: Callable[[str], None],
    ) -> None:
        """Render the held-out pairs the way DPO trains: the final assistant message, after the shared prompt;
        keep how answers are sampled (verifiable pairs) and where to say what was measured."""
        from tinker_cookbook.renderers import TrainOnWhat
        from tinker_cookbook.supervised.data import conversation_to_datum

        self.renderer, self.settings, self.say = renderer, settings, say
        self.pairs = [
            tuple(
                conversation_to_datum(
                    [*row["prompt"], {"role": "assistant", "content": row[side]}],
                    renderer,
                    max_length,
                    TrainOnWhat.LAST_ASSISTANT_MESSAGE,
                )
                for side in ("chosen", "rejected")
            )
            for row in self.rows
        ]

    async def evaluate(self, client: tinker.SamplingClient, label: str) -> tuple[list[Any], float]:
        records, accuracy, margin = await evaluate_preference(
            client, self.pairs, self.rows, self.settings, label
        )
        self.margins[label] = margin
        if self.verifiable:
            task = await evaluate_pair_answers(
                client, records, self.rows, self.renderer, self.settings, label
            )
            self.task_accuracy[label] = task
            self.say(f"{label}: task accuracy {task:.1%} (answers sampled and graded)")
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


async def evaluate_preference(
    client: tinker.SamplingClient,
    pairs: Sequence[tuple[tinker.Datum, tinker.Datum]],
    rows: Sequence[dict],
    settings: SamplingSettings,
    desc: str,
) -> tuple[list[PreferenceExample], float, float]:
    """Return (per-pair rows, preference accuracy, mean margin), over the pairs scored without error.

    Length-normalised so that a longer rejected answer is not "dispreferred" merely for having more tokens
    (DPO itself trains on summed log-probs; the evaluation asks which answer the model finds more likely per
    token)."""

    from posttrain.pipeline.evaluation.nll import mean_completion_logprob

    async def one(i: int, pair: tuple[tinker.Datum, tinker.Datum]) -> PreferenceExample:
        row = rows[i]
        prompt = "\n\n".join(f"{m['role']}: {m['content']}" for m in row["prompt"])
        record = PreferenceExample(i, prompt, row["chosen"], row["rejected"], None, None, None, None)
        try:
            chosen, rejected = await asyncio.gather(
                mean_completion_logprob(client, pair[0]), mean_completion_logprob(client, pair[1])
            )
            record.chosen_logprob, record.rejected_logprob = chosen, rejected
            record.margin = chosen - rejected
            record.correct = record.margin > 0
        except Exception as exc:  # noqa: BLE001 - one bad example must not stop the evaluation
            record.error = short_error(exc)
        return record

    records = await bounded_gather(list(pairs), one, settings.concurrency, desc)
    scored = [r for r in records if r.error is None and r.margin is not None]
    if not scored:
        return records, float("nan"), float("nan")
    accuracy = sum(1 for r in scored if r.correct) / len(scored)
    return records, accuracy, sum(r.margin for r in scored if r.margin is not None) / len(scored)


async def evaluate_pair_answers(
    client: tinker.SamplingClient,
    records: Sequence[PreferenceExample],
    rows: Sequence[dict],
    renderer: renderers.Renderer,
    settings: SamplingSettings,
    desc: str,
) -> float:
    """Answer each pair's prompt by sampling, grade it against the row's `answer`, and fill the records'
    task fields (ground_truth, completion, extracted_answer, task_correct). Returns the task accuracy over all
    pairs (a failed sample counts as wrong, as in RL evaluation)."""
    import tinker
    from tinker_cookbook import renderers

    from posttrain.pipeline.scoring.grading import extract_answer, grade_math

    stop = renderer.get_stop_sequences()

    async def one(i: int, record: PreferenceExample) -> bool:
        record.ground_truth = str(rows[i]["answer"])
        record.completion, record.extracted_answer, record.task_correct = "", "", False
        try:
            params = tinker.SamplingParams(
                max_tokens=settings.max_tokens,
                temperature=settings.temperature,
                stop=stop,
                seed=settings.seed + i,
            )
            prompt = renderer.build_generation_prompt(rows[i]["prompt"])
            response = await client.sample(prompt, num_samples=1, sampling_params=params)
            message, _ = renderer.parse_response(response.sequences[0].tokens)
            record.completion = renderers.get_text_content(message)
            record.extracted_answer = extract_answer(record.completion)
        except Exception as exc:  # noqa: BLE001 - one bad sample must not stop the evaluation
            # The pair's preference score stands; its task answer is recorded as wrong, with the reason.
            record.extracted_answer = f"(sampling failed: {short_error(exc)})"
            return False
        # The cookbook's math grader (its timeout is a signal, so in this thread, not a worker thread).
        record.task_correct = bool(grade_math({"answer": record.ground_truth}, record.extracted_answer))
        return record.task_correct

    correct = await bounded_gather(list(records), one, settings.concurrency, f"{desc}: task accuracy")
    return sum(correct) / len(correct) if correct else float("nan")
