"""Off-policy distillation (and prompt distillation): the student is trained with the cookbook's supervised loop on
the teacher's answers (data/teacher_train.jsonl).

What is trained on (`TRAIN_ON_WHAT`) follows the user's document: distillation from traces trains on the last
assistant message. Prompt distillation ("system prompt baking", where the document says all_tokens) follows the
cookbook's prompt_distillation recipe instead: all assistant messages. The student's conversations carry no system
prompt (that is what is baked away), so all_tokens would train the student to write the users' questions; on these
single-turn conversations all assistant messages is the teacher's answer, as the recipe trains it.
"""

from __future__ import annotations

from collections.abc import Coroutine
from typing import Any

from posttrain.pipeline.methods.base import RunContext
from posttrain.pipeline.methods.sft import supervised_settings

# The cookbook's TrainOnWhat values (its loop is imported only when it runs: settings parsing imports this module).
TRAIN_ON_WHAT = {"distillation": "last_assistant_message", "prompt_distillation": "all_assistant_messages"}


def train(ctx: RunContext, recipe: str) -> Coroutine[Any, Any, Any]:
    """The supervised loop over the traces in the run's data folder (`recipe`: the method, see TRAIN_ON_WHAT)."""
    from tinker_cookbook.renderers import TrainOnWhat
    from tinker_cookbook.supervised import train as sl_train
    from tinker_cookbook.supervised.types import ChatDatasetBuilderCommonConfig

    from posttrain.pipeline.data.chat import ConversationFilesBuilder

    cfg = ctx.cfg
    builder = ConversationFilesBuilder(
        common_config=ChatDatasetBuilderCommonConfig(
            model_name_for_tokenizer=cfg.model_name,
            renderer_name=ctx.renderer_name,
            max_length=cfg.max_length,
            batch_size=cfg.batch_size,
            train_on_what=TrainOnWhat(TRAIN_ON_WHAT[recipe]),
        ),
        train_file=str(ctx.data_dir / "teacher_train.jsonl"),
        eval_file=str(ctx.data_dir / "teacher_eval.jsonl") if cfg.eval_every > 0 else None,
        shuffle_seed=cfg.seed,
    )
    config = sl_train.Config(
        **ctx.loop_settings(),
        recipe_name=f"posttrain_{recipe}_off_policy",
        dataset_builder=builder,
        **supervised_settings(cfg),
    )
    return sl_train.main(config)


def steps(n_prompts: int, cfg: Any) -> int:
    """The supervised loop's steps over the traces (it drops each epoch's last partial batch)."""
    total = n_prompts // cfg.batch_size * cfg.num_epochs
    return min(total, cfg.max_steps) if cfg.max_steps else total
