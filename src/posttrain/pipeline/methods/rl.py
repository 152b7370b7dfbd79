"""RL through the cookbook's `rl.train` loop, over any environment (`envs`): verifiable rewards (`env=math`,
arithmetic, reasoning_gym, code), multi-turn games and tool use, and (`task=rubric`) judged conversations.

The environment makes the problems, the env of one rollout and the results row; this method writes the problems
to the run's logs, hands the cookbook its dataset builder, and evaluates base and trained model the same way:
each held-out problem played once in the same env (`evaluation.episodes`).
"""

from __future__ import annotations

import math
from collections.abc import Coroutine, Mapping
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

import chz

from posttrain.config.run import RunSettings
from posttrain.errors import ConfigError
from posttrain.pipeline.data import LoadedData
from posttrain.pipeline.envs import registry
from posttrain.pipeline.envs.settings import EnvSettings, check_owned
from posttrain.pipeline.methods import warm_start
from posttrain.pipeline.methods.base import Method, RunContext, TrainingStage
from posttrain.pipeline.methods.options import (
    EvalSamplingOptions,
    RewardOptions,
    RLLoopOptions,
    RolloutOptions,
    TemperatureOptions,
    VerifierOptions,
    rollout_settings,
)
from posttrain.pipeline.methods.partner import Partner
from posttrain.pipeline.scoring import verifiers
from posttrain.pipeline.scoring.grading import ANSWER_INSTRUCTION
from posttrain.pipeline.setup.plan import TokenBudget, episode_tokens
from posttrain.util import write_jsonl

if TYPE_CHECKING:
    import tinker

    from posttrain.pipeline.envs.base import EnvContext, ProblemSet
    from posttrain.pipeline.envs.dataset import EpisodeSettings
    from posttrain.pipeline.results import RLExample


class Judging(Protocol):
    """A judge model that scores the episodes (task=rubric's `rubric.Judging`)."""

    method: str  # the method that runs RL with this judge
    env: str  # the environment its episodes run in
    model: str

    def extra_models(self, cfg: Any) -> tuple[str, ...]: ...
    def settings(self, ctx: RunContext) -> dict[str, Any]: ...
    def add_judge_tokens(
        self, budget: TokenBudget, problems: ProblemSet, prompt: float, cfg: Any
    ) -> TokenBudget: ...
    def summary(self) -> dict[str, Any]: ...


@chz.chz
class RLConfig(
    RunSettings,
    EvalSamplingOptions,
    TemperatureOptions,
    RolloutOptions,
    RLLoopOptions,
    RewardOptions,
    VerifierOptions,
    EnvSettings,
    warm_start.WarmStartOptions,
):
    """Every setting of task=rl."""


class RL(Method):
    metric: ClassVar = "score"
    extra_models: tuple[str, ...] = ()

    def __init__(self, cfg: Any, data: LoadedData | None, judging: Judging | None = None):
        self.name = "rl" if judging is None else judging.method
        # task=rubric's settings arrive as an RLConfig (`rubric.rubric`), not as the run's config
        self.cfg = cfg
        default = judging.env if judging is not None else registry.default_env(data.format if data else None)
        self.spec = registry.check(cfg.env or default)
        if cfg.reward_fn is not None:
            verifiers.load(cfg.reward_fn)  # a missing file or function is reported now, in one line
        self.judging = judging
        # before the environment's module: that import takes seconds
        registry.check_inputs(self.spec, cfg, data)
        # env= left to the data: its settings are checked against the environment it chose
        check_owned(cfg, self.spec)
        self.environment = registry.environment(self.spec)
        if cfg.reward_fn is not None and not self.environment.takes_verifier:
            raise ConfigError(f"reward_fn= does not apply to env={self.spec}: the game decides the reward")
        self.partner = Partner.of(cfg, self.spec)
        self.warm_start_steps = warm_start.checked_steps(cfg, self.environment, self.spec)
        self.warm: warm_start.WarmStart | None = None
        self.problems: ProblemSet = self.environment.problems(self.spec, cfg, data)
        if not self.problems.train or not self.problems.eval:
            raise ConfigError("RL needs at least one training and one evaluation problem")
        if judging is not None:
            self.extra_models = judging.extra_models(cfg)
        if self.partner is not None:
            self.extra_models = (*self.extra_models, *self.partner.extra_models)
        # An environment's data may name its own score (e.g. the QA data's grader).
        label = self.problems.info.get("score_label", self.environment.score_label)
        self.score_label = "mean reward (user verifier)" if cfg.reward_fn else label
        if judging is not None:
            self.score_label = f"{self.score_label} (judged by {judging.model})"
        self.rows: dict[str, list[RLExample]] = {}
        self.extra_scores: dict[str, dict[str, float]] = {}

    def prepare(self, ctx: RunContext) -> None:
        from posttrain.pipeline.envs.dataset import EnvironmentDatasetBuilder

        self.ctx = ctx
        cfg = self.cfg
        problems_file = ctx.data_dir / "train_problems.jsonl"
        write_jsonl(problems_file, self.problems.train)
        eval_file = ctx.data_dir / "eval_problems.jsonl"
        write_jsonl(eval_file, self.problems.eval)
        self.total_steps = (
            cfg.max_steps or math.ceil(len(self.problems.train) / cfg.batch_size) * cfg.num_epochs
        )
        self.episodes = self._episode_settings(ctx)
        self.builder = EnvironmentDatasetBuilder(
            rows_file=str(problems_file),
            episodes=self.episodes,
            groups_per_batch=cfg.batch_size,
            group_size=cfg.group_size,
            n_batches=self.total_steps,
            seed=cfg.seed,
            base_url=ctx.base_url,
            # eval_every: the cookbook's test-set evaluator plays the held-out problems during training.
            eval_rows_file=str(eval_file) if cfg.eval_every > 0 else None,
        )
        if "grader" in self.problems.info:
            ctx.say(f"grader: {self.problems.info['grader']} ({self.problems.info['grader_reason']})")
        if "retriever" in self.problems.info:  # env=tools:search: which index, and whether it was reused
            ctx.say(f"retriever: {self.problems.info['retriever']}")
        self._plain = self._plain_context()
        # A prompt built now reports what cannot build one (e.g. a renderer without tool calls) in one line.
        self.environment.prompt(self.problems.eval[0], self._plain)
        self.warm = warm_start.prepare(
            ctx, self.warm_start_steps, self.environment, self.problems.train, self._plain
        )

    def stages(self) -> list[TrainingStage]:
        """One RL loop in the run's log folder, or (warm_start_steps=) the warm start's loop and then RL's."""
        if self.warm is not None:
            return self.warm.stages(self.train, self.total_steps)
        return [TrainingStage("training", self.ctx.log_path, self.total_steps, self.train, self.ctx.run_name)]

    def _episode_settings(self, ctx: RunContext) -> EpisodeSettings:
        from posttrain.pipeline.envs.dataset import EpisodeSettings

        cfg = self.cfg
        judge = self.judging.settings(ctx) if self.judging is not None else {}
        partner = self.partner.settings(ctx) if self.partner is not None else {}
        return EpisodeSettings(
            env=str(self.spec),
            model_name_for_tokenizer=cfg.model_name,
            renderer_name=ctx.renderer_name,
            reward_fn=cfg.reward_fn,
            verifier_errors_file=str(ctx.log_path / verifiers.ERRORS_FILE),
            verifier_timeout=cfg.verifier_timeout,
            grader_concurrency=cfg.eval_concurrency,
            **judge,
            **partner,
        )

    def _plain_context(self) -> EnvContext:
        """The run's renderer without a scorer's workers or a judge: for prompts and token counts."""
        from posttrain.pipeline.envs.base import EnvContext
        from posttrain.pipeline.scoring.scorer import Scorer

        return EnvContext(self.spec, self.ctx.renderer, Scorer())

    async def evaluate(self, client: tinker.SamplingClient, label: str) -> tuple[list[Any], float]:
        from posttrain.pipeline.evaluation.common import SamplingSettings
        from posttrain.pipeline.evaluation.episodes import HeldOut, evaluate_episodes

        cfg = self.cfg
        if not hasattr(self, "_context"):  # once: a judged environment serves its judge for both models
            self._context = await self.episodes.context(self.ctx.service)
        ctx = self._context.for_phase(label)
        settings = SamplingSettings(cfg.max_tokens, cfg.eval_temperature, cfg.seed, cfg.eval_concurrency)
        rows, score = await evaluate_episodes(
            client, HeldOut(self.environment, self.problems.eval, ctx), settings
        )
        self.rows[label] = rows
        # Further held-out sets (HumanEval for env=code:humaneval): the same sampling and scoring, reported beside
        # the main score; their rows are kept in the logs.
        for name, problems in self.problems.extra_eval.items():
            held_out = HeldOut(self.environment, problems, ctx, desc=f"{label}: {name}")
            extra_rows, extra = await evaluate_episodes(client, held_out, settings)
            write_jsonl(
                self.ctx.data_dir / f"{name}_{label.replace(' ', '_')}.jsonl",
                [r.to_dict() for r in extra_rows],
            )
            self.extra_scores.setdefault(name, {})[label] = extra
            self.ctx.say(f"{label}: {name}: {extra:.1%}")
        return rows, score

    def train(self) -> Coroutine[Any, Any, Any]:
        from tinker_cookbook.rl import train as rl_train

        loop = {
            **self.ctx.loop_settings(),
            **(self.warm.stage_settings(warm_start.RL_STAGE) if self.warm is not None else {}),
        }
        config = rl_train.Config(
            **loop,
            **rollout_settings(self.cfg),
            recipe_name=f"posttrain_{self.name}",
            dataset_builder=self.builder,
        )
        return rl_train.main(config)

    def token_budget(self) -> TokenBudget:
        cfg, renderer = self.cfg, self.ctx.renderer
        problems = self.problems.train[:200] + self.problems.eval[:200]
        prompts = [
            renderer.build_generation_prompt(self.environment.prompt(p, self._plain)).length for p in problems
        ]
        prompt = sum(prompts) / len(prompts)
        turns = self.environment.max_turns(self.spec)
        partner = self.partner.model if self.partner is not None else None
        budget = episode_tokens(cfg, prompt, turns, self.total_steps, len(self.problems.eval), partner)
        if self.warm is not None:
            budget = self.warm.add_tokens(budget)
        return self.judging.add_judge_tokens(budget, self.problems, prompt, cfg) if self.judging else budget

    def _asks_for_the_answer_format(self) -> bool:
        """Whether the prompts carry our answer instruction: question/answer environments do; games, tools and
        verifiers environments bring their own prompts."""
        if not self.problems.eval:
            return False
        messages = self.environment.prompt(self.problems.eval[0], self._plain_context())
        return any(ANSWER_INSTRUCTION in str(m.get("content", "")) for m in messages)

    def score_text(self, value: float) -> str:
        return f"{self.score_label} {value:.1%} on {len(self.problems.eval)} held-out {self.environment.noun}"

    def describe(self) -> tuple[Mapping[str, Any], Mapping[str, int], Mapping[str, Any]]:
        cfg = self.cfg
        sizes = {
            "train_problems": len(self.problems.train),
            "eval_problems": len(self.problems.eval),
            "group_size": cfg.group_size,
        }
        dataset = {**self.problems.info, "env": str(self.spec)}
        extra: dict[str, Any] = {"score_label": self.score_label, **self.environment.summary(self.rows)}
        if self.judging is not None:
            extra |= self.judging.summary()
        elif self._asks_for_the_answer_format():
            extra["answer_instruction"] = ANSWER_INSTRUCTION
        for name, scores in self.extra_scores.items():
            extra[f"{name}_score"] = {
                "baseline": scores.get("base model"),
                "trained": scores.get("trained model"),
            }
        if cfg.reward_fn is not None:
            extra |= verifiers.summary(cfg.reward_fn, self.ctx.log_path / verifiers.ERRORS_FILE)
        if self.partner is not None:
            extra |= self.partner.summary()
        if self.warm is not None:
            extra["warm_start"] = self.warm.summary()
        return dataset, sizes, extra
