"""Direct preference optimisation on chosen/rejected pairs, through the cookbook's `preference.train_dpo` loop.

By default the run first fine-tunes on the chosen answers (`dpo_sft_steps`, one pass: the SFT-then-DPO pipeline of
the literature and of the cookbook's RLHF recipe, a `warm_start` stage), and DPO starts from that checkpoint and
takes it as its reference (the loop snapshots its starting weights before the first step). DPO alone pushes the
rejected answers down more than it pulls the chosen ones up: on the gallery's pairs the model's own answers got
longer and wrong (docs/preference.md, measured); the SFT stage anchors the chosen answers first. With
dpo_sft_steps=0 the reference is the base model. Evaluation (`pipeline/preference_eval.py`): per held-out pair,
the length-normalised log-prob of the chosen and of the rejected completion; the score is preference accuracy
(chosen more likely than rejected), the mean margin goes into summary.json, and so does the task accuracy
where the pairs carry an answer.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine, Mapping
from typing import TYPE_CHECKING, Any, ClassVar

import chz

from posttrain.config.checks import whole_number
from posttrain.config.run import RunSettings
from posttrain.errors import ConfigError
from posttrain.pipeline.data import LoadedData
from posttrain.pipeline.data.pair_checks import form_confounds
from posttrain.pipeline.evaluation.common import SamplingSettings
from posttrain.pipeline.evaluation.preference import PreferenceEvaluation
from posttrain.pipeline.methods.base import Method, RunContext, TrainingStage
from posttrain.pipeline.methods.options import EvalSamplingOptions
from posttrain.pipeline.methods.sft import SupervisedOptions, supervised_settings
from posttrain.pipeline.methods.warm_start import WarmStart
from posttrain.pipeline.setup.plan import TokenBudget
from posttrain.util import write_jsonl

if TYPE_CHECKING:
    import tinker

DEFAULT_DPO_BETA = 0.1  # the cookbook's default
# The SFT stage trains on the chosen answer of each pair: a single-turn prompt -> response.
SFT_TRAIN_ON_WHAT = "last_assistant_message"


@chz.chz
class DPOOptions:
    dpo_beta: float | None = chz.field(
        default=None, doc="DPO: strength of the pull towards the reference model (None: 0.1)"
    )
    dpo_sft_steps: int | None = chz.field(
        default=None,
        doc="DPO: supervised steps on the chosen answers first, at the SFT learning rate; DPO starts from them and "
        "takes them as its reference (None: one pass over the training pairs; 0: none, the base model is the "
        "reference)",
    )

    @staticmethod
    def check(cfg: Any) -> None:
        if cfg.dpo_beta is not None and not (isinstance(cfg.dpo_beta, int | float) and cfg.dpo_beta > 0):
            raise ConfigError(f"dpo_beta={cfg.dpo_beta!r} is not valid; expected a number > 0")
        whole_number("dpo_sft_steps", cfg.dpo_sft_steps, 0, allow_none=True)


@chz.chz
class DPOConfig(RunSettings, SupervisedOptions, DPOOptions, EvalSamplingOptions):
    """Every setting of task=dpo (max_tokens and eval_temperature: the task accuracy of verifiable pairs)."""


def chosen_conversation(row: dict) -> list[dict[str, str]]:
    """A pair's prompt and its chosen answer, as a conversation to fine-tune on."""
    return [*row["prompt"], {"role": "assistant", "content": row["chosen"]}]


def comparison_record(row: dict) -> dict:
    """A normalized preference row as the cookbook's `ComparisonBuilderFromJsonl` reads it (A = chosen)."""
    return {
        "comparison": {
            "prompt_conversation": row["prompt"],
            "completion_A": [{"role": "assistant", "content": row["chosen"]}],
            "completion_B": [{"role": "assistant", "content": row["rejected"]}],
        },
        "label": "A",
    }


def pairs_score_text(value: float, data: LoadedData) -> str:
    return f"preference accuracy {value:.1%} on {len(data.eval)} held-out pairs"


def pairs_facts(data: LoadedData) -> tuple[dict[str, Any], dict[str, int]]:
    """The summary's `dataset` and `sizes` of a run on preference pairs (DPO, RLHF)."""
    dataset = {"source": data.source, "format": data.format, "eval_source": data.eval_source}
    return dataset, {"train_pairs": len(data.train), "eval_pairs": len(data.eval)}


def check_pairs(data: LoadedData | None, task: str) -> LoadedData:
    """The data, if it is preference pairs with something to train on and something held out (else ConfigError)."""
    if data is None or data.format != "preference":
        found = f"{data.source} is in the {data.format} format" if data else "no dataset was given"
        raise ConfigError(
            f"task={task} needs preference pairs (prompt/chosen/rejected, or chosen/rejected conversations "
            f"sharing a prompt); {found}"
        )
    if len(data.train) < 2 or not data.eval:
        raise ConfigError(
            f"task={task} needs at least 2 training pairs and 1 held-out pair; {data.source} gave "
            f"{len(data.train)} and {len(data.eval)}"
        )
    return data


class DPO(Method):
    name: ClassVar[str] = "dpo"
    metric: ClassVar = "score"
    score_label: ClassVar[str] = "preference accuracy"
    extra_models: tuple[str, ...] = ()

    def __init__(self, cfg: DPOConfig, data: LoadedData | None):
        self.data = check_pairs(data, self.name)
        self.beta = cfg.dpo_beta if cfg.dpo_beta is not None else DEFAULT_DPO_BETA
        self.held_out = PreferenceEvaluation(data.eval)

    def prepare(self, ctx: RunContext) -> None:
        # The cookbook's DPO modules load torch: imported once the run is past its checks.
        from tinker_cookbook.preference.dpo_datasets import DPODatasetBuilderFromComparisons
        from tinker_cookbook.preference.preference_datasets import ComparisonBuilderFromJsonl
        from tinker_cookbook.supervised.types import ChatDatasetBuilderCommonConfig

        self.ctx = ctx
        cfg = ctx.cfg
        steps = len(self.data.train) // cfg.batch_size * cfg.num_epochs  # full batches of pairs per epoch
        self.total_steps = min(steps, cfg.max_steps) if cfg.max_steps else steps
        self.warm = self._sft_stage(ctx)
        reference = "the SFT stage's model" if self.warm else f"the base model ({cfg.model_name})"
        ctx.say(f"dpo: beta {self.beta:g}, lr {ctx.learning_rate:.3g}, reference model = {reference}")
        self.confounds = form_confounds(self.data.train)
        for note in self.confounds:
            ctx.say(f"data: warning: {note}")
        train_file = ctx.data_dir / "train_pairs.jsonl"
        write_jsonl(train_file, (comparison_record(r) for r in self.data.train))
        write_jsonl(ctx.data_dir / "eval_pairs.jsonl", (comparison_record(r) for r in self.data.eval))
        self.builder = DPODatasetBuilderFromComparisons(
            comparison_builder=ComparisonBuilderFromJsonl(train_path=str(train_file)),
            common_config=ChatDatasetBuilderCommonConfig(
                model_name_for_tokenizer=cfg.model_name,
                renderer_name=ctx.renderer_name,
                max_length=cfg.max_length,
                batch_size=cfg.batch_size,
            ),
        )
        settings = SamplingSettings(cfg.max_tokens, cfg.eval_temperature, cfg.seed, cfg.eval_concurrency)
        self.held_out.prepare(ctx.renderer, cfg.max_length, settings, ctx.say)

    def _sft_stage(self, ctx: RunContext) -> WarmStart | None:
        cfg = ctx.cfg
        one_pass = max(1, len(self.data.train) // cfg.batch_size)
        steps = (
            cfg.dpo_sft_steps if cfg.dpo_sft_steps is not None else min(one_pass, cfg.max_steps or one_pass)
        )
        if not steps:
            return None
        warm = WarmStart.of_conversations(
            ctx,
            steps,
            [chosen_conversation(r) for r in self.data.train],
            train_on_what=SFT_TRAIN_ON_WHAT,
            trained_on="the pair's chosen answer",
            main_stage=self.name,
        )
        ctx.say(
            f"dpo: first {steps} supervised steps of {warm.batch_size} on the chosen answers at lr "
            f"{warm.learning_rate:.3g} (dpo_sft_steps=0: none); DPO starts from them"
        )
        return warm

    def stages(self) -> list[TrainingStage]:
        """DPO's loop in the run's log folder, or the SFT stage's loop and then DPO's, each in its own."""
        if self.warm is not None:
            return self.warm.stages(self.train, self.total_steps)
        return [TrainingStage("training", self.ctx.log_path, self.total_steps, self.train, self.ctx.run_name)]

    async def evaluate(self, client: tinker.SamplingClient, label: str) -> tuple[list[Any], float]:
        return await self.held_out.evaluate(client, label)

    def train(self) -> Coroutine[Any, Any, Any]:
        from tinker_cookbook.preference import train_dpo

        cfg = self.ctx.cfg
        settings = {
            **self.ctx.loop_settings(),
            **(self.warm.stage_settings(self.name) if self.warm is not None else {}),
        }
        config = train_dpo.Config(
            **settings,
            recipe_name="posttrain_dpo",
            dataset_builder=self.builder,
            **supervised_settings(cfg),
            dpo_beta=self.beta,
        )
        # train_dpo.main is synchronous and runs its own event loops (asyncio.run per step): a thread of its own.
        return asyncio.to_thread(train_dpo.main, config)

    def token_budget(self) -> TokenBudget:
        cfg = self.ctx.cfg
        pair_tokens = self.held_out.token_counts()
        mean_pair = sum(pair_tokens) / max(len(pair_tokens), 1)  # the held-out pairs stand for all of them
        sequences = self.total_steps * cfg.batch_size
        budget = TokenBudget(
            # Each pair trains both sides, and the reference model scores both first (prefill).
            train=round(sequences * mean_pair),
            prefill=round(sequences * mean_pair + 2 * sum(pair_tokens)),
            sample=0,
            train_steps=self.total_steps,
            sequences_per_step=2 * cfg.batch_size,
            mean_train_length=mean_pair / 2,
            notes=["held-out pairs scored twice (base, trained); training pairs once by the reference model"],
        )
        return self.warm.add_tokens(budget) if self.warm is not None else budget

    def score_text(self, value: float) -> str:
        return pairs_score_text(value, self.data)

    def describe(self) -> tuple[Mapping[str, Any], Mapping[str, int], Mapping[str, Any]]:
        dataset, sizes = pairs_facts(self.data)
        dataset["form_confounds"] = self.confounds
        extra = {"dpo_beta": self.beta, **self.held_out.summary_fields()}
        if self.warm is not None:
            extra["warm_start"] = self.warm.summary()
        return dataset, sizes, extra
