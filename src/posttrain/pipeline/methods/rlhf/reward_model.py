"""RLHF stage 2: a LoRA of the base model learns to name the preferred answer of a pair shown as "Completion A /
Completion B" (the cookbook's `ChatDatasetBuilderFromComparisons`, trained with `supervised.train`); then its own
accuracy on the held-out pairs, each judged in both orders."""

from __future__ import annotations

from typing import Any

from posttrain.pipeline.methods.rlhf.stages import Stages


async def train(stages: Stages) -> None:
    from tinker_cookbook.preference.preference_datasets import (
        ChatDatasetBuilderFromComparisons,
        ComparisonBuilderFromJsonl,
    )

    cfg, data = stages.ctx.cfg, stages.ctx.data_dir
    # Each pair is shown once per epoch, its order (chosen as A or as B) drawn at random (the cookbook's
    # default), so the model cannot learn "always A".
    builder = ChatDatasetBuilderFromComparisons(
        common_config=stages.common_config(),
        comparison_builder=ComparisonBuilderFromJsonl(
            train_path=str(data / "train_pairs.jsonl"),
            test_path=str(data / "eval_pairs.jsonl") if cfg.eval_every > 0 else None,
        ),
    )
    await stages.supervised("reward_model", builder)


def model_builder(stages: Stages) -> Any:
    """The trained reward model as the cookbook's preference-model builder (what the RL stage's envs call)."""
    from tinker_cookbook.preference.types import PreferenceModelBuilderFromChatRenderer

    return PreferenceModelBuilderFromChatRenderer(
        renderer_name=stages.ctx.renderer_name,
        model_name=stages.ctx.cfg.model_name,
        rm_weights_path=stages.checkpoint("reward_model", "sampler_path"),
        base_url=stages.ctx.base_url,
    )


async def evaluate(stages: Stages) -> dict[str, Any]:
    """The reward model's own accuracy: each held-out pair judged in both orders; a tie or an answer that
    is neither A nor B counts as wrong."""
    from tinker_cookbook.preference.types import Comparison, PreferenceModelFromChatRenderer

    from posttrain.pipeline.evaluation.common import bounded_gather

    ctx = stages.ctx
    path = stages.checkpoint("reward_model", "sampler_path")
    client = await ctx.service.create_sampling_client(model_path=path)
    model = PreferenceModelFromChatRenderer(ctx.renderer, client)

    async def judge(i: int, row: dict) -> tuple[int, int]:
        pair = Comparison(
            prompt_conversation=row["prompt"],
            completion_A=[{"role": "assistant", "content": row["chosen"]}],
            completion_B=[{"role": "assistant", "content": row["rejected"]}],
        )
        # -1: A preferred, 1: B preferred, 0: tie or not a verdict.
        verdicts = (await model(pair), -(await model(pair.swap())))
        return sum(v == -1.0 for v in verdicts), sum(v == 0.0 for v in verdicts)

    judged = await bounded_gather(
        stages.data.eval, judge, ctx.cfg.eval_concurrency, "reward model: held-out pairs"
    )
    total = 2 * len(judged)
    result = {
        "accuracy": sum(c for c, _ in judged) / total,
        "no_verdict": sum(n for _, n in judged) / total,
        "judgements": total,
        "checkpoint": path,
    }
    ctx.say(
        f"reward model: accuracy {result['accuracy']:.1%} on {len(judged)} held-out pairs "
        f"(both orders; {result['no_verdict']:.1%} neither A nor B)"
    )
    return result
