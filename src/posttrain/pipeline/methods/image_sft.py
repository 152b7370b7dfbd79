"""Supervised fine-tuning of a vision-language model as an image classifier: task=sft on image rows (the
cookbook's `vlm_classifier` recipe), through the cookbook's `supervised.train` loop.

The model must take images: a vision-language model of the Tinker lineup (the cookbook's
`model_info.get_model_attributes(name).is_vl`); any other model is refused before anything starts. Rows are
rendered by the model's recommended renderer with its image processor (`data.image_dataset`).

Evaluation: greedy classification accuracy on the held-out images (`evaluation.images`), the base and the trained
model alike; during training the cookbook's NLL evaluator also reports the held-out answers' NLL.
"""

from __future__ import annotations

import random
from collections.abc import Coroutine, Mapping
from typing import TYPE_CHECKING, Any, ClassVar

from posttrain.errors import ConfigError, DataError
from posttrain.pipeline.data import LoadedData, default_train_on_what, images
from posttrain.pipeline.methods.base import Method, RunContext
from posttrain.pipeline.methods.sft import SFTConfig, supervised_settings
from posttrain.pipeline.setup.plan import TokenBudget
from posttrain.util import write_jsonl

if TYPE_CHECKING:
    import tinker

    from posttrain.pipeline.evaluation.common import SamplingSettings

# Rows rendered to estimate the mean training length (each one reads, resizes and encodes an image).
LENGTH_SAMPLE = 256
# Sampled tokens per answer past the longest class name (its newline, the end of turn, a stray token).
ANSWER_MARGIN_TOKENS = 8


def vision_models() -> list[str]:
    """The Tinker lineup's vision-language models (the pinned cookbook's model table)."""
    from posttrain.pipeline.setup.preflight import cookbook_models

    return [name for name, attributes in cookbook_models().items() if attributes.is_vl]


def check_vision_model(model_name: str, source: str) -> None:
    """A one-line refusal unless `model_name` is a vision-language model of the lineup."""
    from posttrain.pipeline.setup.preflight import cookbook_models

    attributes = cookbook_models().get(model_name.split(":", 1)[0])
    if attributes is not None and attributes.is_vl:
        return
    models = vision_models()
    more = f" and {len(models) - 4} more" if len(models) > 4 else ""
    known = "" if attributes is not None else f" (vision-language models: {', '.join(models[:4])}{more})"
    raise ConfigError(f"{source}: image rows need a vision-language model; {model_name} is text-only{known}")


class ImageSFT(Method):
    name: ClassVar[str] = "sft"
    metric: ClassVar = "score"
    score_label: ClassVar[str] = "accuracy"
    extra_models: tuple[str, ...] = ()

    def __init__(self, cfg: SFTConfig, data: LoadedData):
        check_vision_model(cfg.model_name, data.source.removesuffix(" (local file)"))
        self.data = data
        self.classes = images.class_names([*data.train, *data.eval])
        if len(self.classes) < 2:
            raise DataError(
                f"{data.source}: image rows need at least 2 classes to tell apart; every label is "
                f"{self.classes[0]!r}"
            )
        self.train_on_what = cfg.train_on_what or default_train_on_what(data)

    def prepare(self, ctx: RunContext) -> None:
        from posttrain.pipeline.data.image_dataset import ImageRowsBuilder, image_renderer
        from posttrain.pipeline.evaluation.common import SamplingSettings

        self.ctx = ctx
        cfg = ctx.cfg
        chosen = "" if cfg.train_on_what else " (chosen from the data)"
        ctx.say(f"train_on_what: {self.train_on_what}{chosen}")
        ctx.say(
            f"classes: {len(self.classes)} ({', '.join(self.classes[:10])}{', ...' if len(self.classes) > 10 else ''})"
        )
        self.renderer = image_renderer(cfg.model_name, ctx.renderer_name)
        train_file, eval_file = ctx.data_dir / "train.jsonl", ctx.data_dir / "eval.jsonl"
        write_jsonl(train_file, self.data.train)
        write_jsonl(eval_file, self.data.eval)
        self.builder = ImageRowsBuilder(
            model_name=cfg.model_name,
            renderer_name=ctx.renderer_name,
            train_file=str(train_file),
            eval_file=str(eval_file) if cfg.eval_every > 0 else None,
            classes=tuple(self.classes),
            batch_size=cfg.batch_size,
            max_length=cfg.max_length,
            train_on_what=self.train_on_what,
            shuffle_seed=cfg.seed,
        )
        self.settings: SamplingSettings = SamplingSettings(
            max_tokens=self._answer_tokens(), temperature=0.0, seed=cfg.seed, concurrency=cfg.eval_concurrency
        )
        steps = len(self.data.train) // cfg.batch_size * cfg.num_epochs
        self.total_steps = min(steps, cfg.max_steps) if cfg.max_steps else steps

    def _answer_tokens(self) -> int:
        """Enough for the longest class name and the end of the turn (the recipe allows 128 for any)."""
        tokenizer = self.renderer.tokenizer
        longest = max(len(tokenizer.encode(" " + name, add_special_tokens=False)) for name in self.classes)
        return longest + ANSWER_MARGIN_TOKENS

    async def evaluate(self, client: tinker.SamplingClient, label: str) -> tuple[list[Any], float]:
        from posttrain.pipeline.evaluation.images import evaluate_classification

        return await evaluate_classification(
            client, self.data.eval, self.classes, self.renderer, self.settings, label
        )

    def train(self) -> Coroutine[Any, Any, Any]:
        from tinker_cookbook.supervised import train as sl_train

        config = sl_train.Config(
            **self.ctx.loop_settings(),
            recipe_name="posttrain_sft_images",
            dataset_builder=self.builder,
            **supervised_settings(self.ctx.cfg),
        )
        return sl_train.main(config)

    # --- the plan -------------------------------------------------------------------------------------------

    def _plan_image(self, ref: str) -> Any:
        """A local image as it is sent; a URL is not fetched for a plan, and counts as the largest image."""
        return images.placeholder_image() if images.is_url(ref) else images.load_image(ref)

    def _training_length(self, row: dict) -> int:
        from tinker_cookbook.renderers import TrainOnWhat

        from posttrain.pipeline.data.image_dataset import image_datum

        image = self._plan_image(row["image"])
        datum = image_datum(
            self.renderer,
            image,
            row["label"],
            self.classes,
            self.ctx.cfg.max_length,
            TrainOnWhat(self.train_on_what),
        )
        return datum.model_input.length

    def _prompt_length(self, row: dict) -> int:
        from posttrain.pipeline.evaluation.images import classification_prompt

        return classification_prompt(self.renderer, self._plan_image(row["image"]), self.classes).length

    def token_budget(self) -> TokenBudget:
        """Image tokens are counted as the model's image processor counts them (the image chunks'
        `expected_tokens`); URL images are not fetched and count as the largest image sent."""
        cfg = self.ctx.cfg
        train = self.data.train
        sample = random.Random(cfg.seed).sample(train, min(len(train), LENGTH_SAMPLE))
        mean = sum(self._training_length(r) for r in sample) / max(len(sample), 1)
        sequences = self.total_steps * cfg.batch_size
        prompts = sum(self._prompt_length(r) for r in self.data.eval)
        in_training_evals = self.total_steps // cfg.eval_every if cfg.eval_every else 0
        # The in-training NLL scores each held-out answer: about a prompt's tokens plus the answer's.
        nll_tokens = (prompts + len(self.data.eval) * self.settings.max_tokens) * in_training_evals
        notes = [
            "image tokens as the model's image processor counts them (each image resized to at most "
            f"{images.MAX_IMAGE_SIZE} px on its longest side)",
            f"held-out accuracy evaluated twice (base, trained): greedy answers of at most {self.settings.max_tokens} "
            "tokens",
        ]
        if len(sample) < len(train):
            notes.append(f"mean training length from {len(sample)} of the {len(train):,} training rows")
        urls = sum(1 for r in [*sample, *self.data.eval] if images.is_url(r["image"]))
        if urls:
            notes.append(
                f"{urls} image URLs not fetched for the plan: each counted as a {images.MAX_IMAGE_SIZE}x"
                f"{images.MAX_IMAGE_SIZE} image (an upper bound)"
            )
        return TokenBudget(
            train=round(mean * sequences),
            prefill=prompts * 2 + nll_tokens,
            sample=len(self.data.eval) * self.settings.max_tokens * 2,
            train_steps=self.total_steps,
            sequences_per_step=cfg.batch_size,
            mean_train_length=mean,
            notes=notes,
        )

    # --- results --------------------------------------------------------------------------------------------

    def score_text(self, value: float) -> str:
        return f"accuracy {value:.1%} on {len(self.data.eval)} held-out images"

    def describe(self) -> tuple[Mapping[str, Any], Mapping[str, int], Mapping[str, Any]]:
        from posttrain.pipeline.evaluation.images import ACCURACY_DEFINITION

        dataset = {
            "source": self.data.source,
            "format": self.data.format,
            "eval_source": self.data.eval_source,
            "train_on_what": self.train_on_what,
            "classes": self.classes,
        }
        sizes = {
            "train_rows": len(self.data.train),
            "eval_rows": len(self.data.eval),
            "classes": len(self.classes),
        }
        return dataset, sizes, {"accuracy_definition": ACCURACY_DEFINITION}
