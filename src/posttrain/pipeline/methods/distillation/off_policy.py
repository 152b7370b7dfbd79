"""Off-policy distillation (and prompt distillation): the student is trained with the cookbook's supervised loop on
the teacher's answers (data/teacher_train.jsonl), the last assistant message of each."""

from __future__ import annotations

from collections.abc import Coroutine
from typing import Any

from tinker_cookbook.renderers import TrainOnWhat
from tinker_cookbook.supervised import train as sl_train
from tinker_cookbook.supervised.types import ChatDatasetBuilderCommonConfig

from posttrain.pipeline.data.chat import ConversationFilesBuilder
from posttrain.pipeline.methods.base import RunContext


def train(ctx: RunContext, recipe: str) -> Coroutine[Any, Any, Any]:
    """The supervised loop over the traces in the run's data folder."""
    cfg = ctx.cfg
    builder = ConversationFilesBuilder(
        common_config=ChatDatasetBuilderCommonConfig(
            model_name_for_tokenizer=cfg.model_name, renderer_name=ctx.renderer_name, max_length=cfg.max_length,
            batch_size=cfg.batch_size, train_on_what=TrainOnWhat.LAST_ASSISTANT_MESSAGE,
        ),
        train_file=str(ctx.data_dir / "teacher_train.jsonl"),
        eval_file=str(ctx.data_dir / "teacher_eval.jsonl") if cfg.eval_every > 0 else None,
        shuffle_seed=cfg.seed,
    )  # fmt: skip
    config = sl_train.Config(
        **ctx.loop_settings(), recipe_name=f"posttrain_{recipe}_off_policy", dataset_builder=builder,
        lr_schedule=cfg.lr_schedule, num_epochs=cfg.num_epochs, max_steps=cfg.max_steps,
    )  # fmt: skip
    return sl_train.main(config)


def steps(n_prompts: int, cfg: Any) -> int:
    """The supervised loop's steps over the traces (it drops each epoch's last partial batch)."""
    total = n_prompts // cfg.batch_size * cfg.num_epochs
    return min(total, cfg.max_steps) if cfg.max_steps else total
