"""A supervised warm start before a method's own loop: N steps of the cookbook's `supervised.train` on
conversations, then the method's loop from that checkpoint in its own folder. DPO's SFT stage on the chosen answers
(`dpo_sft_steps`, `methods.dpo`) is one; RL's is the other.

RL's (`warm_start_steps=N`, task=rl in an environment that can demonstrate its task: today
env=tools:search): N steps of the cookbook's `supervised.train` on worked answers the environment makes from its
own training problems (the tool called with the question, the tool's real reply, the right answer), then RL from
that checkpoint.

RL reinforces what the policy already does now and then. A small model that never calls the tool (SmolLM2-135M
called the search tool in 0 of 72 held-out episodes and 0 of 64 rollouts) gives it nothing to reinforce; worked
answers teach the call, and RL goes on from there. The baseline stays the base model's, so the gain a run reports
is the warm start and RL together (the measurement in docs/rl-tools.md tells them apart); summary.json's
`warm_start` says how the warm start was made.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import chz

from posttrain.config.checks import whole_number
from posttrain.errors import ConfigError, UserError
from posttrain.pipeline.methods.base import RunContext, TrainingStage, stage_checkpoint
from posttrain.util import write_jsonl

if TYPE_CHECKING:
    from posttrain.pipeline.envs.base import EnvContext
    from posttrain.pipeline.setup.plan import TokenBudget

STAGE = "warm_start"
RL_STAGE = "rl"
TRAIN_FILE = "warm_start_train.jsonl"
# Only the demonstration's own calls and answer carry loss: the opening's worked example is in every prompt.
TRAIN_ON_WHAT = "customized"


@chz.chz
class WarmStartOptions:
    warm_start_steps: int = chz.field(
        default=0,
        doc="env=tools:search: supervised steps on worked answers made from the training problems (the tool "
        "called with the question, its real reply, the answer) before RL, which starts from them (0: none)",
    )

    @staticmethod
    def check(cfg: Any) -> None:
        whole_number("warm_start_steps", cfg.warm_start_steps, 0)


def checked_steps(cfg: Any, environment: Any, spec: Any) -> int:
    """The run's warm_start_steps (task=rubric's settings have none), refused where the environment has no worked
    answers to show, before anything starts."""
    steps: int = getattr(cfg, "warm_start_steps", 0)
    if steps and not environment.demonstrates(spec):
        raise ConfigError(
            f"warm_start_steps is only used by an environment that can demonstrate its task (env=tools:search), "
            f"not env={spec}; leave it out"
        )
    return steps


def prepare(
    ctx: RunContext, steps: int, environment: Any, problems: Sequence[dict], env_ctx: EnvContext
) -> WarmStart | None:
    """The warm start of a run with `steps` (None without): its worked answers made and written now."""
    return WarmStart.prepare(ctx, steps, environment, problems, env_ctx) if steps else None


@dataclass
class WarmStart:
    ctx: RunContext
    steps: int
    batch_size: int
    learning_rate: float
    learning_rate_source: str
    demonstrations: int
    problems: int
    mean_length: float  # a worked answer's tokens (the whole conversation), for the token budget
    train_on_what: str = TRAIN_ON_WHAT
    trained_on: str = "the worked answer's tool calls and final answer"  # summary.json's words for it
    main_stage: str = RL_STAGE  # the method's own loop, after the warm start

    @property
    def dir(self) -> Path:
        return self.ctx.log_path / STAGE

    @classmethod
    def prepare(
        cls, ctx: RunContext, steps: int, environment: Any, problems: Sequence[dict], env_ctx: EnvContext
    ) -> WarmStart:
        """The demonstrations (written to the run's data folder) and the stage's length and learning rate.
        `environment` is one `checked_steps` accepted: its `demonstration(problem, ctx)` is a worked answer or None."""

        made = [environment.demonstration(p, env_ctx) for p in problems]
        kept = [m for m in made if m is not None]
        if not kept:
            raise UserError(
                f"warm_start_steps={steps}: none of the {len(problems)} training problems has a worked answer "
                "(the tool's reply to the question never held its answer)"
            )
        warm = cls.of_conversations(ctx, steps, kept)
        warm.problems = len(problems)
        missed = len(problems) - len(kept)
        left_out = f" ({missed} left out: the tool's reply did not hold the answer)" if missed else ""
        ctx.say(
            f"warm start: {len(kept)} worked answers from {len(problems)} training problems{left_out}, {steps} "
            f"supervised steps of {warm.batch_size} at lr {warm.learning_rate:.3g}, then RL from them"
        )
        return warm

    @classmethod
    def of_conversations(
        cls, ctx: RunContext, steps: int, conversations: list[list[dict]], **how: Any
    ) -> WarmStart:
        """A warm start on `conversations` (written to the run's data folder) at the supervised learning rate;
        `how`: train_on_what, trained_on, main_stage where they are not RL's."""
        from tinker_cookbook.renderers import TrainOnWhat

        from posttrain.pipeline.methods.choice import default_learning_rate

        train_on_what = how.get("train_on_what", TRAIN_ON_WHAT)
        write_jsonl(
            ctx.data_dir / TRAIN_FILE, ({"messages": [_jsonable(m) for m in c]} for c in conversations)
        )
        lr, source = default_learning_rate(ctx.cfg.model_name, "sft")
        sample = conversations[:200]
        what = TrainOnWhat(train_on_what)
        length = sum(ctx.renderer.build_supervised_example(c, what)[0].length for c in sample) / len(sample)
        batch = min(ctx.cfg.batch_size, len(conversations))
        return cls(ctx, steps, batch, lr, source, len(conversations), len(conversations), length, **how)

    def train(self) -> Coroutine[Any, Any, Any]:
        """The cookbook's `supervised.train` on the demonstrations, in its own folder."""
        from tinker_cookbook.renderers import TrainOnWhat
        from tinker_cookbook.supervised import train as sl_train
        from tinker_cookbook.supervised.types import ChatDatasetBuilderCommonConfig

        from posttrain.pipeline.data.chat import ConversationFilesBuilder

        ctx, cfg = self.ctx, self.ctx.cfg
        common = ChatDatasetBuilderCommonConfig(
            model_name_for_tokenizer=cfg.model_name,
            renderer_name=ctx.renderer_name,
            max_length=None,
            batch_size=self.batch_size,
            train_on_what=TrainOnWhat(self.train_on_what),
        )
        builder = ConversationFilesBuilder(
            common_config=common, train_file=str(ctx.data_dir / TRAIN_FILE), shuffle_seed=cfg.seed
        )
        batches = self.demonstrations // self.batch_size
        settings = {
            **ctx.loop_settings(),
            **self.stage_settings(STAGE),
            "learning_rate": self.learning_rate,
            "max_steps": self.steps,
            "num_epochs": math.ceil(self.steps / batches),
            "eval_every": 0,
        }
        return sl_train.main(
            sl_train.Config(**settings, recipe_name=f"posttrain_rl_{STAGE}", dataset_builder=builder)
        )

    def stages(self, main: Callable[[], Coroutine[Any, Any, Any]], steps: int) -> list[TrainingStage]:
        """The warm start's loop, then the method's (`main`) in its own folder, from the warm start's checkpoint."""
        run, name = self.ctx.run_name, self.main_stage
        return [
            TrainingStage(STAGE, self.dir, self.steps, self.train, f"{run}-{STAGE}"),
            TrainingStage(name, self.ctx.log_path / name, steps, main, f"{run}-{name}"),
        ]

    def add_tokens(self, budget: TokenBudget) -> TokenBudget:
        """RL's token budget with the warm start's supervised steps added."""
        sequences, rollouts = self.steps * self.batch_size, budget.train_steps * budget.sequences_per_step
        train, steps = budget.train + sequences * self.mean_length, budget.train_steps + self.steps
        return replace(
            budget,
            train=round(train),
            train_steps=steps,
            sequences_per_step=max(1, round((rollouts + sequences) / steps)),
            mean_train_length=train / max(rollouts + sequences, 1),
            notes=[
                *budget.notes,
                f"warm start: {self.steps} supervised steps of {self.batch_size} conversations",
            ],
        )

    def stage_settings(self, stage: str) -> dict[str, Any]:
        """A stage's own folder and W&B name; the method's loop starts from the warm start's checkpoint."""
        shared = self.ctx.loop_settings()
        settings: dict[str, Any] = {
            "log_path": str(self.ctx.log_path / stage),
            "wandb_name": f"{shared['wandb_name']}-{stage}",
        }
        if stage != STAGE:
            settings["load_checkpoint_path"] = self.checkpoint()
        return settings

    def checkpoint(self) -> str:
        return stage_checkpoint(self.dir, "state_path", "the warm start")

    def summary(self) -> dict[str, Any]:
        return {
            "steps": self.steps,
            "batch_size": self.batch_size,
            "learning_rate": self.learning_rate,
            "learning_rate_source": self.learning_rate_source,
            "demonstrations": self.demonstrations,
            "training_problems": self.problems,
            "train_on_what": f"{self.train_on_what} ({self.trained_on})",
            "log_path": str(self.dir),
        }


def _jsonable(message: dict) -> dict:
    calls = message.get("tool_calls")
    return {**message, "tool_calls": [c.model_dump() for c in calls]} if calls else message
