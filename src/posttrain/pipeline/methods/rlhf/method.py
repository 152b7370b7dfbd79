"""task=rlhf: the settings, the method (three stages, see the package docstring), its plan and summary.

Steps and learning rates follow the run's settings: every stage takes num_epochs passes over the training pairs
at batch_size (capped by max_steps); the SFT and reward-model stages use the learning rate, the RL stage half of
it (as RL runs do here). Evaluation (base and trained the same): held-out preference accuracy and mean margin, as
for DPO, and the task accuracy where the pairs carry an answer.
"""

from __future__ import annotations

import random
from collections.abc import Coroutine, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import chz

from posttrain.config.run import RunSettings
from posttrain.pipeline.data import LoadedData
from posttrain.pipeline.evaluation.common import SamplingSettings
from posttrain.pipeline.evaluation.preference import PreferenceEvaluation
from posttrain.pipeline.methods.base import Method, RunContext, TrainingStage
from posttrain.pipeline.methods.dpo import (
    SFT_TRAIN_ON_WHAT,
    check_pairs,
    chosen_conversation,
    comparison_record,
    pairs_facts,
    pairs_score_text,
)
from posttrain.pipeline.methods.options import (
    EvalSamplingOptions,
    RLLoopOptions,
    RolloutOptions,
    TemperatureOptions,
)
from posttrain.pipeline.methods.rlhf import policy, reward_model
from posttrain.pipeline.methods.rlhf.stages import STAGES, Stages, sft
from posttrain.pipeline.methods.sft import SupervisedOptions
from posttrain.pipeline.setup.plan import TokenBudget
from posttrain.util import write_jsonl

if TYPE_CHECKING:
    import tinker

# The cookbook recipe's RL learning rate is far below its SFT rate; here RL halves the rate, as task=rl does.
RL_LR_FACTOR = 0.5
# The cookbook's own choice in its RLHF recipe: PairwisePreferenceGroupBuilder's matchups within chunks of 4.
MATCHUP_GROUP_SIZE = 4


@chz.chz
class RLHFConfig(
    RunSettings, SupervisedOptions, EvalSamplingOptions, TemperatureOptions, RolloutOptions, RLLoopOptions
):
    """Every setting of task=rlhf: its SFT and reward-model stages' and its RL stage's."""


class RLHF(Method):
    name: ClassVar[str] = "rlhf"
    metric: ClassVar = "score"
    score_label: ClassVar[str] = "preference accuracy"
    extra_models: tuple[str, ...] = ()

    def __init__(self, cfg: RLHFConfig, data: LoadedData | None):
        self.data = check_pairs(data, self.name)
        self.held_out = PreferenceEvaluation(self.data.eval)
        self.reward_model: dict[str, Any] = {}

    def prepare(self, ctx: RunContext) -> None:
        self.ctx = ctx
        cfg = ctx.cfg
        train = self.data.train
        epochs = len(train) // cfg.batch_size * cfg.num_epochs  # full batches, as the cookbook's datasets
        self.steps = {stage: min(epochs, cfg.max_steps) if cfg.max_steps else epochs for stage in STAGES}
        self.total_steps = sum(self.steps.values())
        rates = {
            "sft": ctx.learning_rate,
            "reward_model": ctx.learning_rate,
            "rl": ctx.learning_rate * RL_LR_FACTOR,
        }
        self.stages_ = Stages(ctx, self.data, self.steps, rates)
        data = ctx.data_dir
        write_jsonl(data / "sft_train.jsonl", ({"messages": chosen_conversation(r)} for r in train))
        write_jsonl(data / "sft_eval.jsonl", ({"messages": chosen_conversation(r)} for r in self.data.eval))
        write_jsonl(data / "train_pairs.jsonl", (comparison_record(r) for r in train))
        write_jsonl(data / "eval_pairs.jsonl", (comparison_record(r) for r in self.data.eval))
        # The RL dataset reads its file front to back, once: num_epochs shuffled passes over the prompts.
        rng, prompts = random.Random(cfg.seed), []
        for _ in range(cfg.num_epochs):
            prompts += rng.sample(train, len(train))
        write_jsonl(data / "rl_prompts.jsonl", (comparison_record(r) for r in prompts))
        settings = SamplingSettings(cfg.max_tokens, cfg.eval_temperature, cfg.seed, cfg.eval_concurrency)
        self.held_out.prepare(ctx.renderer, cfg.max_length, settings, ctx.say)
        ctx.say(
            "rlhf: stages sft -> reward_model -> rl, "
            + ", ".join(f"{s} {self.steps[s]} steps at lr {rates[s]:.3g}" for s in STAGES)
        )

    @property
    def learning_rates(self) -> dict[str, float]:
        return self.stages_.learning_rates

    def stage_dir(self, stage: str) -> Path:
        return self.stages_.dir(stage)

    def stages(self) -> list[TrainingStage]:
        run = self.ctx.run_name
        starts = {"sft": lambda: sft(self.stages_), "reward_model": self._reward_model, "rl": self._rl}
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

    def _reward_model(self) -> Coroutine[Any, Any, None]:
        return reward_model.train(self.stages_)

    async def _evaluate_reward_model(self) -> None:
        self.reward_model = await reward_model.evaluate(self.stages_)

    async def _rl(self) -> None:
        if not self.reward_model:  # a resumed run whose reward-model stage finished before the stop
            await self._evaluate_reward_model()
        await policy.train(self.stages_)

    async def evaluate(self, client: tinker.SamplingClient, label: str) -> tuple[list[Any], float]:
        return await self.held_out.evaluate(client, label)

    def token_budget(self) -> TokenBudget:
        from tinker_cookbook.preference.types import Comparison, ComparisonRendererFromChatRenderer
        from tinker_cookbook.rl.preference_envs import TournamentPattern, get_pairs_chunked

        cfg, renderer = self.ctx.cfg, self.ctx.renderer
        rows = self.data.train[:200]
        prompt = _mean(renderer.build_generation_prompt(r["prompt"]).length for r in rows)
        chosen = _mean(renderer.build_supervised_example(chosen_conversation(r))[0].length for r in rows)
        comparisons = ComparisonRendererFromChatRenderer(renderer)
        judged = _mean(
            comparisons.build_generation_prompt(
                Comparison(
                    r["prompt"],
                    [{"role": "assistant", "content": r["chosen"]}],
                    [{"role": "assistant", "content": r["rejected"]}],
                )
            ).length
            for r in rows
        )
        rollouts = self.steps["rl"] * cfg.batch_size * cfg.group_size
        matchups = len(
            get_pairs_chunked(cfg.group_size, TournamentPattern.ALL_PAIRS_BOTH_WAYS, MATCHUP_GROUP_SIZE)
        )
        judgements = self.steps["rl"] * cfg.batch_size * matchups + 2 * len(self.data.eval)
        # A judged answer is the policy's (at most max_tokens) where the data's pair stood.
        judged_rl = judged - 2 * (chosen - prompt) + 2 * cfg.max_tokens
        pairs = sum(self.held_out.token_counts())
        sequences = (self.steps["sft"] + self.steps["reward_model"]) * cfg.batch_size
        train = round(
            self.steps["sft"] * cfg.batch_size * chosen
            + self.steps["reward_model"] * cfg.batch_size * judged
            + rollouts * (prompt + cfg.max_tokens)
        )
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
        return pairs_score_text(value, self.data)

    def describe(self) -> tuple[Mapping[str, Any], Mapping[str, int], Mapping[str, Any]]:
        dataset, sizes = pairs_facts(self.data)
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
                    "log_path": str(self.stages_.dir(s)),
                    **({"train_on_what": SFT_TRAIN_ON_WHAT} if s == "sft" else {}),
                }
                for s in STAGES
            },
            "reward_model_checkpoint": rm.get("checkpoint"),
        }
        return dataset, sizes, extra


def _mean(values: Any) -> float:
    values = list(values)
    return sum(values) / max(len(values), 1)
