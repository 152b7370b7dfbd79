"""RLHF in the cookbook's three stages (tinker_cookbook/recipes/preference/rlhf), as one run on one data set of
chosen/rejected pairs:

1. sft: the policy is fine-tuned on the chosen answers (`supervised.train`);
2. reward_model: a LoRA of the base model learns to name the preferred answer of a pair shown as
   "Completion A / Completion B" (the cookbook's `ChatDatasetBuilderFromComparisons` and comparison renderer,
   trained with `supervised.train`); afterwards its own accuracy on the held-out pairs is measured (both orders);
3. rl: the SFT policy is trained with `rl.train` on the training prompts in the cookbook's pairwise-preference
   environments (`rl.preference_envs`): `group_size` answers per prompt, compared all-pairs-both-ways by the
   reward model, win minus loss is the reward.

Each stage logs to its own folder, results/logs/<run>/{sft,reward_model,rl}/. Steps and learning rates follow
the run's settings: every stage takes num_epochs passes over the training pairs at batch_size (capped by
max_steps); the SFT and reward-model stages use the learning rate, the RL stage half of it (as RL runs do here).
Evaluation (base and trained the same): held-out preference accuracy and mean margin, as for DPO, and the task
accuracy where the pairs carry an answer.
"""

from __future__ import annotations

import random
from collections.abc import Coroutine, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from posttrain.config import TrainConfig
from posttrain.errors import UserError
from posttrain.pipeline.data import LoadedData
from posttrain.pipeline.evaluation.preference import PreferenceEvaluation
from posttrain.pipeline.methods.base import RunContext, TrainingStage
from posttrain.pipeline.methods.dpo import check_pairs, comparison_record
from posttrain.pipeline.setup.plan import TokenBudget
from posttrain.util import write_jsonl

if TYPE_CHECKING:
    import tinker

# The cookbook recipe's RL learning rate is far below its SFT rate; here RL halves the rate, as task=rl does.
RL_LR_FACTOR = 0.5
# The cookbook's own choices in its RLHF recipe.
MATCHUP_GROUP_SIZE = 4  # PairwisePreferenceGroupBuilder's default: matchups within chunks of 4 answers
STAGES = ("sft", "reward_model", "rl")


class RLHF:
    name: ClassVar[str] = "rlhf"
    metric: ClassVar = "score"
    score_label: ClassVar[str] = "preference accuracy"
    extra_models: tuple[str, ...] = ()

    def __init__(self, cfg: TrainConfig, data: LoadedData | None):
        self.data = check_pairs(data, self.name)
        self.held_out = PreferenceEvaluation(self.data.eval)
        self.reward_model: dict[str, Any] = {}

    # --- preparation ---------------------------------------------------------------------------------

    def prepare(self, ctx: RunContext) -> None:
        self.ctx = ctx
        cfg = ctx.cfg
        train = self.data.train
        epochs = len(train) // cfg.batch_size * cfg.num_epochs  # full batches, as the cookbook's datasets
        self.steps = {stage: min(epochs, cfg.max_steps) if cfg.max_steps else epochs for stage in STAGES}
        self.total_steps = sum(self.steps.values())
        self.learning_rates = {
            "sft": ctx.learning_rate,
            "reward_model": ctx.learning_rate,
            "rl": ctx.learning_rate * RL_LR_FACTOR,
        }
        data = ctx.data_dir
        write_jsonl(data / "sft_train.jsonl", ({"messages": _chosen_conversation(r)} for r in train))
        write_jsonl(data / "sft_eval.jsonl", ({"messages": _chosen_conversation(r)} for r in self.data.eval))
        write_jsonl(data / "train_pairs.jsonl", (comparison_record(r) for r in train))
        write_jsonl(data / "eval_pairs.jsonl", (comparison_record(r) for r in self.data.eval))
        # The RL dataset reads its file front to back, once: num_epochs shuffled passes over the prompts.
        rng, prompts = random.Random(cfg.seed), []
        for _ in range(cfg.num_epochs):
            prompts += rng.sample(train, len(train))
        write_jsonl(data / "rl_prompts.jsonl", (comparison_record(r) for r in prompts))
        self.held_out.prepare(ctx)
        ctx.say(
            "rlhf: stages sft -> reward_model -> rl, "
            + ", ".join(f"{s} {self.steps[s]} steps at lr {self.learning_rates[s]:.3g}" for s in STAGES)
        )

    def stage_dir(self, stage: str) -> Path:
        return self.ctx.log_path / stage

    def stages(self) -> list[TrainingStage]:
        run = self.ctx.run_name
        starts = {"sft": self._sft, "reward_model": self._reward_model, "rl": self._rl}
        # The reward model's own accuracy is measured once its loop (and progress bar) has finished.
        after = {"reward_model": self._evaluate_reward_model}
        return [
            TrainingStage(s, self.stage_dir(s), self.steps[s], starts[s], f"{run}-{s}", after.get(s))
            for s in STAGES
        ]

    def train(self) -> Coroutine[Any, Any, Any]:
        return self._all_stages()

    async def _all_stages(self) -> None:
        for stage in self.stages():
            await stage.start()
            if stage.after is not None:
                await stage.after()

    # --- the stages --------------------------------------------------------------------------------------

    def _settings(self, stage: str) -> dict[str, Any]:
        return {
            **self.ctx.loop_settings(),
            "log_path": str(self.stage_dir(stage)),
            "learning_rate": self.learning_rates[stage],
            "wandb_name": f"{self.ctx.run_name}-{stage}",
        }

    def _common_config(self, train_on_what: Any = None) -> Any:
        from tinker_cookbook.supervised.types import ChatDatasetBuilderCommonConfig

        cfg = self.ctx.cfg
        return ChatDatasetBuilderCommonConfig(
            model_name_for_tokenizer=cfg.model_name,
            renderer_name=self.ctx.renderer_name,
            max_length=cfg.max_length,
            batch_size=cfg.batch_size,
            train_on_what=train_on_what,
        )

    def _sft(self) -> Coroutine[Any, Any, Any]:
        from tinker_cookbook.renderers import TrainOnWhat
        from tinker_cookbook.supervised import train as sl_train

        from posttrain.pipeline.data.chat import ConversationFilesBuilder

        cfg, data = self.ctx.cfg, self.ctx.data_dir
        builder = ConversationFilesBuilder(
            common_config=self._common_config(TrainOnWhat.LAST_ASSISTANT_MESSAGE),
            train_file=str(data / "sft_train.jsonl"),
            eval_file=str(data / "sft_eval.jsonl") if cfg.eval_every > 0 else None,
            shuffle_seed=cfg.seed,
        )
        return sl_train.main(
            sl_train.Config(
                **self._settings("sft"),
                recipe_name="posttrain_rlhf_sft",
                dataset_builder=builder,
                lr_schedule=cfg.lr_schedule,
                num_epochs=cfg.num_epochs,
                max_steps=cfg.max_steps,
            )
        )

    async def _reward_model(self) -> None:
        from tinker_cookbook.preference.preference_datasets import (
            ChatDatasetBuilderFromComparisons,
            ComparisonBuilderFromJsonl,
        )
        from tinker_cookbook.supervised import train as sl_train

        cfg, data = self.ctx.cfg, self.ctx.data_dir
        # Each pair is shown once per epoch, its order (chosen as A or as B) drawn at random (the cookbook's
        # default), so the model cannot learn "always A".
        builder = ChatDatasetBuilderFromComparisons(
            common_config=self._common_config(),
            comparison_builder=ComparisonBuilderFromJsonl(
                train_path=str(data / "train_pairs.jsonl"),
                test_path=str(data / "eval_pairs.jsonl") if cfg.eval_every > 0 else None,
            ),
        )
        await sl_train.main(
            sl_train.Config(
                **self._settings("reward_model"),
                recipe_name="posttrain_rlhf_reward_model",
                dataset_builder=builder,
                lr_schedule=cfg.lr_schedule,
                num_epochs=cfg.num_epochs,
                max_steps=cfg.max_steps,
            )
        )

    def _checkpoint(self, stage: str, key: str) -> str:
        from tinker_cookbook import checkpoint_utils

        record = checkpoint_utils.get_last_checkpoint(str(self.stage_dir(stage)), required_key=key)
        path = getattr(record, key, None) if record is not None else None
        if not path:
            raise UserError(
                f"rlhf: the {stage} stage left no checkpoint in {self.stage_dir(stage)}/checkpoints.jsonl"
            )
        return path

    def _preference_model_builder(self) -> Any:
        from tinker_cookbook.preference.types import PreferenceModelBuilderFromChatRenderer

        return PreferenceModelBuilderFromChatRenderer(
            renderer_name=self.ctx.renderer_name,
            model_name=self.ctx.cfg.model_name,
            rm_weights_path=self._checkpoint("reward_model", "sampler_path"),
            base_url=self.ctx.base_url,
        )

    async def _evaluate_reward_model(self) -> None:
        """The reward model's own accuracy: each held-out pair judged in both orders; a tie or an answer that
        is neither A nor B counts as wrong."""
        from tinker_cookbook.preference.types import Comparison, PreferenceModelFromChatRenderer

        from posttrain.pipeline.evaluation.episodes import bounded_gather

        path = self._checkpoint("reward_model", "sampler_path")
        client = await self.ctx.service.create_sampling_client_async(model_path=path)
        model = PreferenceModelFromChatRenderer(self.ctx.renderer, client)

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
            self.data.eval, judge, self.ctx.cfg.eval_concurrency, "reward model: held-out pairs"
        )
        total = 2 * len(judged)
        self.reward_model = {
            "accuracy": sum(c for c, _ in judged) / total,
            "no_verdict": sum(n for _, n in judged) / total,
            "judgements": total,
            "checkpoint": path,
        }
        self.ctx.say(
            f"reward model: accuracy {self.reward_model['accuracy']:.1%} on {len(judged)} held-out pairs "
            f"(both orders; {self.reward_model['no_verdict']:.1%} neither A nor B)"
        )

    async def _rl(self) -> None:
        from tinker_cookbook.preference.comparison_policy_evaluator import ComparisonEvaluator
        from tinker_cookbook.preference.preference_datasets import ComparisonBuilderFromJsonl
        from tinker_cookbook.preference.types import Comparison
        from tinker_cookbook.rl import preference_envs
        from tinker_cookbook.rl import train as rl_train

        cfg = self.ctx.cfg
        if not self.reward_model:  # a resumed run whose reward-model stage finished before the stop
            await self._evaluate_reward_model()
        preference_model = self._preference_model_builder()
        dataset = preference_envs.PairwisePreferenceRLDatasetBuilder(
            comparison_builder=ComparisonBuilderFromJsonl(
                train_path=str(self.ctx.data_dir / "rl_prompts.jsonl")
            ),
            batch_size=cfg.batch_size,
            policy_renderer_name=self.ctx.renderer_name,
            policy_model_name=cfg.model_name,
            preference_model_builder=preference_model,
            group_size=cfg.group_size,
            tournament_pattern=preference_envs.TournamentPattern.ALL_PAIRS_BOTH_WAYS,
        )
        evaluators = []
        if cfg.eval_every > 0:
            # The recipe's in-training evaluation: the policy's answer against the held-out chosen answer,
            # judged by the reward model both ways (test/win_rate in metrics.jsonl).
            references = [
                Comparison(row["prompt"], [{"role": "assistant", "content": row["chosen"]}], [])
                for row in self.data.eval
            ]

            def win_rate() -> ComparisonEvaluator:
                return ComparisonEvaluator(
                    preference_model_builder=preference_model,
                    comparisons=references,
                    renderer_name=self.ctx.renderer_name,
                    model_name_for_tokenizer=cfg.model_name,
                    max_tokens=cfg.max_tokens,
                )

            evaluators.append(win_rate)
        await rl_train.main(
            rl_train.Config(
                **self._settings("rl"),
                recipe_name="posttrain_rlhf_rl",
                dataset_builder=dataset,
                load_checkpoint_path=self._checkpoint("sft", "state_path"),
                evaluator_builders=evaluators,
                **self.ctx.rl_settings(),
            )
        )

    # --- evaluation and reporting ---------------------------------------------------------------------------

    async def evaluate(self, client: tinker.SamplingClient, label: str) -> tuple[list[Any], float]:
        return await self.held_out.evaluate(client, label)

    def token_budget(self) -> TokenBudget:
        from tinker_cookbook.preference.types import Comparison, ComparisonRendererFromChatRenderer
        from tinker_cookbook.rl.preference_envs import TournamentPattern, get_pairs_chunked

        cfg, renderer = self.ctx.cfg, self.ctx.renderer
        rows = self.data.train[:200]
        prompt = _mean(renderer.build_generation_prompt(r["prompt"]).length for r in rows)
        chosen = _mean(renderer.build_supervised_example(_chosen_conversation(r))[0].length for r in rows)
        comparisons = ComparisonRendererFromChatRenderer(renderer)
        judged = _mean(
            comparisons.build_generation_prompt(
                Comparison(r["prompt"], [{"role": "assistant", "content": r["chosen"]}],
                           [{"role": "assistant", "content": r["rejected"]}])
            ).length
            for r in rows
        )  # fmt: skip
        rollouts = self.steps["rl"] * cfg.batch_size * cfg.group_size
        matchups = len(
            get_pairs_chunked(cfg.group_size, TournamentPattern.ALL_PAIRS_BOTH_WAYS, MATCHUP_GROUP_SIZE)
        )
        judgements = self.steps["rl"] * cfg.batch_size * matchups + 2 * len(self.data.eval)
        # A judged answer is the policy's (at most max_tokens) where the data's pair stood.
        judged_rl = judged - 2 * (chosen - prompt) + 2 * cfg.max_tokens
        pairs = sum(self.held_out.token_counts())
        sequences = (self.steps["sft"] + self.steps["reward_model"]) * cfg.batch_size
        train = round(self.steps["sft"] * cfg.batch_size * chosen + self.steps["reward_model"] * cfg.batch_size * judged
                      + rollouts * (prompt + cfg.max_tokens))  # fmt: skip
        task_samples = 2 * len(self.data.eval) if self.held_out.verifiable else 0
        return TokenBudget(
            train=train,
            prefill=round(rollouts * prompt + judgements * judged_rl + 2 * pairs + task_samples * prompt),
            sample=(rollouts + task_samples) * cfg.max_tokens + judgements,
            train_steps=self.total_steps,
            sequences_per_step=max(1, round((sequences + rollouts) / max(self.total_steps, 1))),
            mean_train_length=train / max(sequences + rollouts, 1),
            notes=[
                "stages: " + ", ".join(f"{s} {self.steps[s]} steps" for s in STAGES),
                f"rl: {matchups} reward-model judgements per {cfg.group_size} answers; completions counted at "
                f"max_tokens={cfg.max_tokens} (upper bound)",
            ],
        )

    def score_text(self, value: float) -> str:
        return f"preference accuracy {value:.1%} on {len(self.data.eval)} held-out pairs"

    def describe(self) -> tuple[Mapping[str, Any], Mapping[str, int], Mapping[str, Any]]:
        dataset = {
            "source": self.data.source,
            "format": self.data.format,
            "eval_source": self.data.eval_source,
        }
        sizes = {"train_pairs": len(self.data.train), "eval_pairs": len(self.data.eval)}
        rm = self.reward_model
        extra = {
            **self.held_out.summary_fields(),
            "reward_model_accuracy": rm.get("accuracy"),
            "reward_model_no_verdict": rm.get("no_verdict"),
            "reward_model_accuracy_definition": "fraction of held-out pairs x both orders (chosen as A and as "
            "B) in which the reward model names the chosen answer; a tie or no A/B verdict counts as wrong",
            "stages": {
                s: {
                    "steps": self.steps[s],
                    "learning_rate": self.learning_rates[s],
                    "log_path": str(self.stage_dir(s)),
                }
                for s in STAGES
            },
            "reward_model_checkpoint": rm.get("checkpoint"),
        }
        return dataset, sizes, extra


def _chosen_conversation(row: dict) -> list[dict[str, str]]:
    return [*row["prompt"], {"role": "assistant", "content": row["chosen"]}]


def _mean(values: Any) -> float:
    values = list(values)
    return sum(values) / max(len(values), 1)
