"""The cookbook dataset builder over the pipeline's normalized conversation files (SFT and distillation)."""

from __future__ import annotations

import chz
import datasets
import tinker
from tinker_cookbook.renderers import TrainOnWhat
from tinker_cookbook.renderers.base import ToolCall
from tinker_cookbook.supervised.data import SupervisedDatasetFromHFDataset, conversation_to_datum
from tinker_cookbook.supervised.types import ChatDatasetBuilder, SupervisedDataset

from posttrain.util import read_jsonl


@chz.chz
class ConversationFilesBuilder(ChatDatasetBuilder):
    """Train and held-out conversations from two JSONL files written by the pipeline (already validated).

    Unlike the cookbook's `FromConversationFileBuilder`, the held-out set is our own split (the data set's test
    split or the 10% carve-out), so the in-training `test/nll` curve uses exactly the rows of the final evaluation.
    """

    train_file: str
    eval_file: str | None = None
    shuffle_seed: int = 0

    def datums(self, rows: list[dict]) -> list[tinker.Datum]:
        return [self._to_datum(r) for r in rows]

    def _to_datum(self, row: dict) -> tinker.Datum:
        train_on_what = TrainOnWhat(self.common_config.train_on_what or TrainOnWhat.LAST_ASSISTANT_MESSAGE)
        messages = [_with_tool_calls(m) for m in row["messages"]]
        return conversation_to_datum(messages, self.renderer, self.common_config.max_length, train_on_what)

    def __call__(self) -> tuple[SupervisedDataset, SupervisedDataset | None]:
        train = datasets.Dataset.from_list(read_jsonl(self.train_file)).shuffle(seed=self.shuffle_seed)
        train_ds = SupervisedDatasetFromHFDataset(
            train, batch_size=self.common_config.batch_size, map_fn=self._to_datum
        )
        if not self.eval_file:
            return train_ds, None
        held_out = datasets.Dataset.from_list(read_jsonl(self.eval_file))
        return train_ds, SupervisedDatasetFromHFDataset(
            held_out, batch_size=len(held_out), map_fn=self._to_datum
        )


def _with_tool_calls(message: dict) -> dict:
    """A message read back through a Hugging Face dataset: the keys other messages have are filled with None (the
    renderers read a present `tool_calls` as calls), and the calls are dicts where the renderers take `ToolCall`s."""
    message = {k: v for k, v in message.items() if v is not None}
    if "tool_calls" in message:
        message["tool_calls"] = [ToolCall.model_validate(c) for c in message["tool_calls"]]
    return message
