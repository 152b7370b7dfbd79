"""Image classification evaluation (task=sft on image rows), the recipe's `ClassifierEvaluator`: each held-out
image with the question, the answer prefilled up to its ":" and sampled greedily, the class read after the last
":"; the score is the accuracy, the same for the base and the trained model.

Rows follow the RL schema: the image (its path or URL, never its bytes) as the question, the label as the ground
truth, the sampled text, the class read from it, and whether it is the label's class. An image that cannot be
read or fetched fails its example (counted as wrong), not the evaluation.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from posttrain.pipeline.data import images
from posttrain.pipeline.evaluation.common import SamplingSettings, bounded_gather, check_some_succeeded
from posttrain.pipeline.results import RLExample
from posttrain.util import short_error

if TYPE_CHECKING:
    import tinker
    from tinker_cookbook import renderers

ACCURACY_DEFINITION = (
    "fraction of held-out images whose greedy answer, read after its last ':' as the cookbook's vlm_classifier "
    "recipe reads it, is the label's class name (an image that could not be read counts as wrong)"
)


def classification_prompt(
    renderer: renderers.Renderer, image: object, classes: Sequence[str]
) -> tinker.ModelInput:
    """The user turn (image, question), then the assistant's turn prefilled with the answer's prefix."""
    messages = images.prompt_messages(image, classes)
    return renderer.build_generation_prompt(messages, role="assistant", prefill=images.ANSWER_PREFIX)


async def evaluate_classification(
    client: tinker.SamplingClient,
    rows: Sequence[dict],
    classes: Sequence[str],
    renderer: renderers.Renderer,
    settings: SamplingSettings,
    desc: str,
) -> tuple[list[RLExample], float]:
    """Per-image rows (RL schema) and the accuracy over all of them."""
    import tinker
    from tinker_cookbook import renderers as cookbook_renderers

    stop = renderer.get_stop_sequences()

    async def one(i: int, row: dict) -> RLExample:
        record = RLExample(i, row["image"], row["label"], "", "", False)
        try:
            prompt = classification_prompt(renderer, images.load_image(row["image"]), classes)
            params = tinker.SamplingParams(
                max_tokens=settings.max_tokens,
                temperature=settings.temperature,
                stop=stop,
                seed=settings.seed + i,
            )
            response = await client.sample(prompt, num_samples=1, sampling_params=params)
            message, _ = renderer.parse_response(response.sequences[0].tokens)
            record.completion = cookbook_renderers.get_text_content(message)
        except Exception as exc:  # noqa: BLE001 - one bad image or request must not stop the evaluation
            record.error, record.correct = short_error(exc), None
            return record
        record.extracted_answer = images.predicted_class(record.completion)
        record.correct = record.extracted_answer == images.class_name(row["label"])
        return record

    records = await bounded_gather(list(rows), one, settings.concurrency, desc)
    check_some_succeeded(records, desc)
    accuracy = sum(1 for r in records if r.correct) / len(records) if records else float("nan")
    return records, accuracy
