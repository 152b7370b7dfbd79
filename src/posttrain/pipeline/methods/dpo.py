"""Direct preference optimisation on chosen/rejected pairs, through the cookbook's `preference.train_dpo` loop.

The reference model is the base model: the loop snapshots the freshly created LoRA (zero update, so exactly
the base weights) before the first step. Evaluation (`pipeline/preference_eval.py`): per held-out pair,
the length-normalised log-prob of the chosen and of the rejected completion; the score is preference accuracy
(chosen more likely than rejected), the mean margin goes into summary.json, and so does the task accuracy
where the pairs carry an answer.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine, Mapping
from typing import TYPE_CHECKING, Any, ClassVar

import chz

from posttrain.config.run import RunSettings
from posttrain.errors import ConfigError
from posttrain.pipeline.data import LoadedData
from posttrain.pipeline.data.pair_checks import form_confounds
from posttrain.pipeline.evaluation.common import SamplingSettings
from posttrain.pipeline.evaluation.preference import PreferenceEvaluation
from posttrain.pipeline.methods.base import RunContext
from posttrain.pipeline.methods.options import EvalSamplingOptions
from posttrain.pipeline.methods.sft import SupervisedOptions, supervised_settings
from posttrain.pipeline.setup.plan import TokenBudget
from posttrain.util import write_jsonl

if TYPE_CHECKING:
    import tinker

DEFAULT_DPO_BETA = 0.1  # the cookbook's default


@chz.chz
class DPOOptions:
    dpo_beta: float | None = chz.field(
        default=None, doc="DPO: strength of the pull towards the reference (base) model (None: 0.1)"
    )

    @staticmethod
    def check(cfg: Any) -> None:
        if cfg.dpo_beta is not None and not (isinstance(cfg.dpo_beta, int | float) and cfg.dpo_beta > 0):
            raise ConfigError(f"dpo_beta={cfg.dpo_beta!r} is not valid; expected a number > 0")


@chz.chz
class DPOConfig(RunSettings, SupervisedOptions, DPOOptions, EvalSamplingOptions):
    """Every setting of task=dpo (max_tokens and eval_temperature: the task accuracy of verifiable pairs)."""


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


class DPO:
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
        ctx.say(f"dpo: beta {self.beta:g}, reference model = the base model ({cfg.model_name})")
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

    async def evaluate(self, client: tinker.SamplingClient, label: str) -> tuple[list[Any], float]:
        return await self.held_out.evaluate(client, label)

    def train(self) -> Coroutine[Any, Any, Any]:
        from tinker_cookbook.preference import train_dpo

        cfg = self.ctx.cfg
        settings = self.ctx.loop_settings()
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
        return TokenBudget(
            # Each pair trains both sides, and the reference model scores both first (prefill).
            train=round(sequences * mean_pair),
            prefill=round(sequences * mean_pair + 2 * sum(pair_tokens)),
            sample=0,
            train_steps=self.total_steps,
            sequences_per_step=2 * cfg.batch_size,
            mean_train_length=mean_pair / 2,
            notes=["held-out pairs scored twice (base, trained); training pairs once by the reference model"],
        )

    def score_text(self, value: float) -> str:
        return pairs_score_text(value, self.data)

    def describe(self) -> tuple[Mapping[str, Any], Mapping[str, int], Mapping[str, Any]]:
        dataset, sizes = pairs_facts(self.data)
        dataset["form_confounds"] = self.confounds
        return dataset, sizes, {"dpo_beta": self.beta, **self.held_out.summary_fields()}
