"""The cookbook dataset builder over the pipeline's image classification files (task=sft on image rows).

Like the recipe's `ClassifierDataset`: each row becomes the image and the question, answered with the class
name, rendered by the model's renderer with its image processor (the image goes out as an image chunk of the
processor's token count). Images are read when their batch is built, so a data set never sits in memory at once.
Unlike the recipe there is no random horizontal flip: the training rows are exactly the rows given.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

import chz
import tinker
from tinker_cookbook import renderers
from tinker_cookbook.image_processing_utils import get_image_processor
from tinker_cookbook.supervised.common import datum_from_model_input_weights
from tinker_cookbook.supervised.types import SupervisedDataset, SupervisedDatasetBuilder

from posttrain.errors import PreflightError
from posttrain.pipeline.data import images
from posttrain.pipeline.setup.preflight import load_tokenizer
from posttrain.util import read_jsonl, short_error


def image_renderer(model_name: str, renderer_name: str) -> renderers.Renderer:
    """The model's renderer with its image processor (`get_image_processor`, as the recipe builds it)."""
    try:
        processor = get_image_processor(model_name)
    except Exception as exc:  # noqa: BLE001 - offline and not cached, an unknown model, a missing package
        raise PreflightError(
            f"model_name={model_name}: its image processor cannot be loaded ({short_error(exc, 240)}); "
            "image rows are rendered with it"
        ) from None
    return renderers.get_renderer(
        renderer_name, tokenizer=load_tokenizer(model_name), image_processor=processor
    )


def image_datum(
    renderer: renderers.Renderer,
    image: Any,
    label: str,
    classes: Sequence[str],
    max_length: int,
    train_on_what: renderers.TrainOnWhat,
) -> tinker.Datum:
    """One training example: the image and the question, answered with the label's class name."""
    model_input, weights = renderer.build_supervised_example(
        images.training_messages(image, label, classes), train_on_what=train_on_what
    )
    return datum_from_model_input_weights(model_input, weights, max_length=max_length)


class ImageRowsDataset(SupervisedDataset):
    """Batches of rendered image rows, in an order shuffled per epoch; the last partial batch is dropped, as the
    cookbook's supervised datasets do (`batch_size=len(rows)`: the whole held-out set as one batch)."""

    def __init__(
        self, rows: list[dict], batch_size: int, render: Any, seed: int = 0, shuffle: bool = True
    ) -> None:
        self.rows, self.batch_size, self.render, self.seed, self.shuffle = (
            rows,
            batch_size,
            render,
            seed,
            shuffle,
        )
        self.set_epoch(0)

    def set_epoch(self, seed: int = 0) -> None:
        self.order = list(range(len(self.rows)))
        if self.shuffle:
            random.Random(self.seed + seed).shuffle(self.order)

    def get_batch(self, index: int) -> list[tinker.Datum]:
        picked = self.order[index * self.batch_size : (index + 1) * self.batch_size]
        return [self.render(self.rows[i]) for i in picked]

    def __len__(self) -> int:
        return len(self.rows) // self.batch_size


@chz.chz
class ImageRowsBuilder(SupervisedDatasetBuilder):
    """Train and held-out image rows from two JSONL files written by the pipeline (already validated)."""

    model_name: str
    renderer_name: str
    train_file: str
    eval_file: str | None = None
    classes: tuple[str, ...]
    batch_size: int
    max_length: int
    train_on_what: str = "last_assistant_message"
    shuffle_seed: int = 0

    def datum(self, renderer: renderers.Renderer, row: dict) -> tinker.Datum:
        image = images.load_image(row["image"])
        return image_datum(
            renderer,
            image,
            row["label"],
            self.classes,
            self.max_length,
            renderers.TrainOnWhat(self.train_on_what),
        )

    def __call__(self) -> tuple[SupervisedDataset, SupervisedDataset | None]:
        renderer = image_renderer(self.model_name, self.renderer_name)

        def render(row: dict) -> tinker.Datum:
            return self.datum(renderer, row)

        train = ImageRowsDataset(read_jsonl(self.train_file), self.batch_size, render, self.shuffle_seed)
        if not self.eval_file:
            return train, None
        held_out = read_jsonl(self.eval_file)
        return train, ImageRowsDataset(held_out, len(held_out), render, shuffle=False)
