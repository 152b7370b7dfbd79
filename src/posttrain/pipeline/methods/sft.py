"""Supervised fine-tuning on chat data, through the cookbook's `supervised.train` loop.

Evaluation: the NLL of the held-out completion tokens (the tokens `train_on_what` trains on), per example and
token-weighted overall, the number the cookbook's NLL evaluator reports.
"""

from __future__ import annotations

from collections.abc import Coroutine, Mapping
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import chz
from tinker_cookbook.utils.lr_scheduling import LRSchedule

from posttrain.config.checks import at_least, choices
from posttrain.config.parse import UnsupportedConfigError
from posttrain.config.run import RunSettings
from posttrain.errors import ConfigError
from posttrain.pipeline.data import LoadedData, default_train_on_what
from posttrain.pipeline.data.formats import CHAT_FORMATS
from posttrain.pipeline.methods.base import Method, RunContext
from posttrain.pipeline.setup.plan import TokenBudget
from posttrain.util import write_jsonl

if TYPE_CHECKING:
    import tinker


# tinker_cookbook.renderers.TrainOnWhat values, minus CUSTOMIZED (needs per-token weights we never build); spelled
# out because importing the renderers pulls in torch, and settings are checked before that (a test pins them).
TrainOnWhatName = Literal[
    "last_assistant_message",
    "last_assistant_turn",
    "all_assistant_messages",
    "all_messages",
    "all_tokens",
    "all_user_and_system_messages",
]


@chz.chz
class SupervisedOptions:
    """What the cookbook's supervised loops (`supervised.train.Config`, `preference.train_dpo.Config`) take."""

    lr_schedule: LRSchedule = chz.field(default="linear", doc="linear|cosine|constant")
    max_length: int = chz.field(default=2048, doc="max tokens per training example")
    adam_beta1: float = chz.field(default=0.9, doc="Adam beta1 (the cookbook's default)")
    adam_beta2: float = chz.field(default=0.95, doc="Adam beta2 (the cookbook's default)")
    adam_eps: float = chz.field(default=1e-8, doc="Adam epsilon (the cookbook's default)")

    @staticmethod
    def check(cfg: Any) -> None:
        at_least("max_length", cfg.max_length, 16)
        for name in ("adam_beta1", "adam_beta2"):
            value = getattr(cfg, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
                raise ConfigError(f"{name}={value!r} is not valid; expected a number in [0, 1)")
        if (
            isinstance(cfg.adam_eps, bool)
            or not isinstance(cfg.adam_eps, (int, float))
            or not cfg.adam_eps > 0
        ):
            raise ConfigError(f"adam_eps={cfg.adam_eps!r} is not valid; expected a number > 0")
        if cfg.lr_schedule not in choices(LRSchedule):  # another schedule is a warmup Tinker does not offer
            raise UnsupportedConfigError(
                [f"lr_schedule={cfg.lr_schedule}"], sorted(chz.chz_fields(type(cfg)))
            )


def supervised_settings(cfg: Any) -> dict[str, Any]:
    """The optimisation fields of a supervised cookbook Config (`supervised.train`, `preference.train_dpo`)."""
    return dict(
        lr_schedule=cfg.lr_schedule,
        adam_beta1=cfg.adam_beta1,
        adam_beta2=cfg.adam_beta2,
        adam_eps=cfg.adam_eps,
        num_epochs=cfg.num_epochs,
        max_steps=cfg.max_steps,
    )


@chz.chz
class SFTOptions:
    train_on_what: TrainOnWhatName | None = chz.field(
        default=None,
        doc="SFT loss tokens: last_assistant_message|all_assistant_messages|all_messages|all_tokens|... "
        "(None: chosen from the data)",
    )


@chz.chz
class SFTConfig(RunSettings, SupervisedOptions, SFTOptions):
    """Every setting of task=sft."""


class SFT(Method):
    name: ClassVar[str] = "sft"
    metric: ClassVar = "nll"
    score_label: ClassVar[str] = "NLL"
    extra_models: tuple[str, ...] = ()

    def __init__(self, cfg: SFTConfig, data: LoadedData | None):
        if data is None or data.format not in CHAT_FORMATS:
            found = f"{data.source} is in the {data.format} format" if data else "no dataset was given"
            raise ConfigError(
                f"task=sft needs chat data (messages, prompt/completion, instruction/output or ShareGPT "
                f"conversations); {found}"
            )
        self.data = data
        self.train_on_what = cfg.train_on_what or default_train_on_what(data)

    def prepare(self, ctx: RunContext) -> None:
        from tinker_cookbook.renderers import TrainOnWhat
        from tinker_cookbook.supervised.types import ChatDatasetBuilderCommonConfig

        from posttrain.pipeline.data.chat import ConversationFilesBuilder

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
        # The cookbook's supervised dataset drops the last partial batch of each epoch.
        steps = len(self.data.train) // cfg.batch_size * cfg.num_epochs
        self.total_steps = min(steps, cfg.max_steps) if cfg.max_steps else steps

    async def evaluate(self, client: tinker.SamplingClient, label: str) -> tuple[list[Any], float]:
        from posttrain.pipeline.evaluation.answers import answer_budget, greedy_answers
        from posttrain.pipeline.evaluation.nll import evaluate_nll

        concurrency = self.ctx.cfg.eval_concurrency
        rows, nll = await evaluate_nll(client, self.eval_datums, self.data.eval, concurrency, label)
        # What the model now writes, beside how likely it finds the reference (report.html shows both).
        budget = answer_budget(self.ctx.renderer, self.data.eval)
        answers = await greedy_answers(client, self.ctx.renderer, self.data.eval, budget, concurrency, label)
        for row, answer in zip(rows, answers, strict=False):
            row.answer = answer
        return rows, nll

    def train(self) -> Coroutine[Any, Any, Any]:
        from tinker_cookbook.supervised import train as sl_train

        config = sl_train.Config(
            **self.ctx.loop_settings(),
            recipe_name="posttrain_sft",
            dataset_builder=self.builder,
            **supervised_settings(self.ctx.cfg),
        )
        return sl_train.main(config)

    def token_budget(self) -> TokenBudget:
        cfg = self.ctx.cfg
        train_lengths = [d.model_input.length for d in self.builder.datums(self.data.train)]
        mean = sum(train_lengths) / max(len(train_lengths), 1)
        sequences = self.total_steps * cfg.batch_size
        # compute_logprobs scores the whole sequence: the model input plus its last target token.
        eval_tokens = sum(d.model_input.length + 1 for d in self.eval_datums)
        in_training_evals = self.total_steps // cfg.eval_every if cfg.eval_every else 0
        from posttrain.pipeline.evaluation.answers import ANSWERED_ROWS, answer_budget

        answered = min(ANSWERED_ROWS, len(self.data.eval))
        return TokenBudget(
            train=round(mean * sequences),
            prefill=eval_tokens * (2 + in_training_evals),
            # Each model's greedy answers to the first held-out prompts (at most this many tokens each).
            sample=2 * answered * answer_budget(self.ctx.renderer, self.data.eval),
            train_steps=self.total_steps,
            sequences_per_step=cfg.batch_size,
            mean_train_length=mean,
            notes=[
                f"held-out NLL evaluated {2 + in_training_evals} times (base, trained, every {cfg.eval_every} steps)",
                f"each model's greedy answers to {answered} held-out prompts (shown beside the NLL)",
            ],
        )

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
