"""RLHF stage 3: the SFT policy trained with `rl.train` on the training prompts in the cookbook's pairwise-preference
environments (`rl.preference_envs`): `group_size` answers per prompt, compared all-pairs-both-ways by the reward
model, win minus loss is the reward."""

from __future__ import annotations

from typing import Any

from posttrain.pipeline.methods.options import rollout_settings
from posttrain.pipeline.methods.rlhf import reward_model
from posttrain.pipeline.methods.rlhf.stages import Stages


async def train(stages: Stages) -> None:
    from tinker_cookbook.preference.preference_datasets import ComparisonBuilderFromJsonl
    from tinker_cookbook.rl import preference_envs
    from tinker_cookbook.rl import train as rl_train

    cfg = stages.ctx.cfg
    preference_model = reward_model.model_builder(stages)
    dataset = preference_envs.PairwisePreferenceRLDatasetBuilder(
        comparison_builder=ComparisonBuilderFromJsonl(
            train_path=str(stages.ctx.data_dir / "rl_prompts.jsonl")
        ),
        batch_size=cfg.batch_size,
        policy_renderer_name=stages.ctx.renderer_name,
        policy_model_name=cfg.model_name,
        preference_model_builder=preference_model,
        group_size=cfg.group_size,
        tournament_pattern=preference_envs.TournamentPattern.ALL_PAIRS_BOTH_WAYS,
    )
    await rl_train.main(
        rl_train.Config(
            **{**stages.settings("rl"), "load_checkpoint_path": stages.checkpoint("sft", "state_path")},
            recipe_name="posttrain_rlhf_rl",
            dataset_builder=dataset,
            evaluator_builders=_win_rate(stages, preference_model) if cfg.eval_every > 0 else [],
            # A KL penalty holds the policy near the SFT model it starts from (the usual RLHF reference).
            **rollout_settings(cfg, reference=stages.checkpoint("sft", "sampler_path")),
        )
    )


def _win_rate(stages: Stages, preference_model: Any) -> list[Any]:
    """The recipe's in-training evaluation: the policy's answer against the held-out chosen answer, judged by
    the reward model both ways (test/win_rate in metrics.jsonl)."""
    from tinker_cookbook.preference.comparison_policy_evaluator import ComparisonEvaluator
    from tinker_cookbook.preference.types import Comparison

    cfg = stages.ctx.cfg
    references = [
        Comparison(row["prompt"], [{"role": "assistant", "content": row["chosen"]}], [])
        for row in stages.data.eval
    ]

    def win_rate() -> ComparisonEvaluator:
        return ComparisonEvaluator(
            preference_model_builder=preference_model,
            comparisons=references,
            renderer_name=stages.ctx.renderer_name,
            model_name_for_tokenizer=cfg.model_name,
            max_tokens=cfg.max_tokens,
        )

    return [win_rate]
