"""What every RLHF stage reads (the run, the pairs, each stage's steps, learning rate and folder), and stage 1:
the policy fine-tuned on the chosen answers with `supervised.train`."""

from __future__ import annotations

from collections.abc import Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from posttrain.pipeline.data import LoadedData
from posttrain.pipeline.methods.base import RunContext, stage_checkpoint
from posttrain.pipeline.methods.dpo import SFT_TRAIN_ON_WHAT
from posttrain.pipeline.methods.sft import supervised_settings

STAGES = ("sft", "reward_model", "rl")


@dataclass
class Stages:
    ctx: RunContext
    data: LoadedData  # preference pairs
    steps: dict[str, int]
    learning_rates: dict[str, float]

    def dir(self, stage: str) -> Path:
        return self.ctx.log_path / stage

    def settings(self, stage: str) -> dict[str, Any]:
        """The cookbook Config fields every stage sets alike: its own folder, learning rate and W&B name. A
        load_checkpoint_path= starts the policy (the SFT stage); the reward model starts from the base model and
        the RL stage from the SFT stage's checkpoint."""
        shared = self.ctx.loop_settings()
        return {
            **shared,
            "log_path": str(self.dir(stage)),
            "learning_rate": self.learning_rates[stage],
            "wandb_name": f"{shared['wandb_name']}-{stage}",
            "load_checkpoint_path": shared["load_checkpoint_path"] if stage == "sft" else None,
        }

    def common_config(self, train_on_what: Any = None) -> Any:
        from tinker_cookbook.supervised.types import ChatDatasetBuilderCommonConfig

        cfg = self.ctx.cfg
        return ChatDatasetBuilderCommonConfig(
            model_name_for_tokenizer=cfg.model_name,
            renderer_name=self.ctx.renderer_name,
            max_length=cfg.max_length,
            batch_size=cfg.batch_size,
            train_on_what=train_on_what,
        )

    def supervised(self, stage: str, builder: Any) -> Coroutine[Any, Any, Any]:
        """The cookbook's `supervised.train` loop of a stage (SFT, the reward model) on `builder`'s data."""
        from tinker_cookbook.supervised import train as sl_train

        cfg = self.ctx.cfg
        return sl_train.main(
            sl_train.Config(
                **self.settings(stage),
                recipe_name=f"posttrain_rlhf_{stage}",
                dataset_builder=builder,
                **supervised_settings(cfg),
            )
        )

    def checkpoint(self, stage: str, key: str) -> str:
        """The last checkpoint a finished stage saved (`state_path` or `sampler_path`)."""
        return stage_checkpoint(self.dir(stage), key, f"rlhf: the {stage} stage")


def sft(stages: Stages) -> Coroutine[Any, Any, Any]:
    from tinker_cookbook.renderers import TrainOnWhat

    from posttrain.pipeline.data.chat import ConversationFilesBuilder

    cfg, data = stages.ctx.cfg, stages.ctx.data_dir
    builder = ConversationFilesBuilder(
        common_config=stages.common_config(TrainOnWhat(SFT_TRAIN_ON_WHAT)),
        train_file=str(data / "sft_train.jsonl"),
        eval_file=str(data / "sft_eval.jsonl") if cfg.eval_every > 0 else None,
        shuffle_seed=cfg.seed,
    )
    return stages.supervised("sft", builder)
