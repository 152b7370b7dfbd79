"""Supervised fine-tuning on chat data, through the cookbook's `supervised.train` loop.

Evaluation: the NLL of the held-out completion tokens (the tokens `train_on_what` trains on), per example and
token-weighted overall, the number the cookbook's NLL evaluator reports.
"""

from __future__ import annotations

from collections.abc import Coroutine, Mapping
from typing import Any, ClassVar

import chz
import datasets
import tinker
from tinker_cookbook.renderers import TrainOnWhat
from tinker_cookbook.supervised import train as sl_train
from tinker_cookbook.supervised.data import SupervisedDatasetFromHFDataset, conversation_to_datum
from tinker_cookbook.supervised.types import (
    ChatDatasetBuilder,
    ChatDatasetBuilderCommonConfig,
    SupervisedDataset,
)

from posttrain.config import TrainConfig
from posttrain.errors import ConfigError
from posttrain.pipeline.data import LoadedData, default_train_on_what
from posttrain.pipeline.data_formats import CHAT_FORMATS
from posttrain.pipeline.evaluation import evaluate_nll
from posttrain.pipeline.methods.base import RunContext
from posttrain.util import read_jsonl, write_jsonl


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
        return conversation_to_datum(
            row["messages"], self.renderer, self.common_config.max_length, train_on_what
        )

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


class SFT:
    name: ClassVar[str] = "sft"
    metric: ClassVar = "nll"
    data_formats: ClassVar[frozenset[str]] = CHAT_FORMATS

    def __init__(self, cfg: TrainConfig, data: LoadedData | None):
        if data is None or data.format not in CHAT_FORMATS:
            found = f"{data.source} is in the {data.format} format" if data else "no dataset was given"
            raise ConfigError(
                f"task=sft needs chat data (messages, prompt/completion, instruction/output or ShareGPT "
                f"conversations); {found}"
            )
        self.data = data
        self.train_on_what = cfg.train_on_what or default_train_on_what(data)

    def prepare(self, ctx: RunContext) -> None:
        self.ctx = ctx
        cfg = ctx.cfg
        chosen = "" if cfg.train_on_what else " (chosen from the data)"
        ctx.say(f"train_on_what: {self.train_on_what}{chosen}")
        train_file, eval_file = ctx.data_dir / "train.jsonl", ctx.data_dir / "eval.jsonl"
        write_jsonl(train_file, ({"messages": r["messages"]} for r in self.data.train))
        write_jsonl(eval_file, ({"messages": r["messages"]} for r in self.data.eval))
        self.builder = ConversationFilesBuilder(
            common_config=ChatDatasetBuilderCommonConfig(
                model_name_for_tokenizer=cfg.model_name,
                renderer_name=ctx.renderer_name,
                max_length=cfg.max_length,
                batch_size=cfg.batch_size,
                train_on_what=TrainOnWhat(self.train_on_what),
            ),
            train_file=str(train_file),
            eval_file=str(eval_file) if cfg.eval_every > 0 else None,
            shuffle_seed=cfg.seed,
        )
        self.eval_datums = self.builder.datums(self.data.eval)

    async def evaluate(self, client: tinker.SamplingClient, label: str) -> tuple[list[Any], float]:
        return await evaluate_nll(
            client, self.eval_datums, self.data.eval, self.ctx.cfg.eval_concurrency, label
        )

    def train(self) -> Coroutine[Any, Any, Any]:
        cfg = self.ctx.cfg
        config = sl_train.Config(
            **self.ctx.loop_settings(),
            recipe_name="posttrain_sft",
            dataset_builder=self.builder,
            lr_schedule=cfg.lr_schedule,
            num_epochs=cfg.num_epochs,
            max_steps=cfg.max_steps,
        )
        return sl_train.main(config)

    def score_text(self, value: float) -> str:
        return f"held-out NLL {value:.4f} on {len(self.data.eval)} examples"

    def describe(self) -> tuple[Mapping[str, Any], Mapping[str, int], Mapping[str, Any]]:
        dataset = {
            "source": self.data.source,
            "format": self.data.format,
            "eval_source": self.data.eval_source,
            "train_on_what": self.train_on_what,
        }
        return dataset, {"train_rows": len(self.data.train), "eval_rows": len(self.data.eval)}, {}
