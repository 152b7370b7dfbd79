"""RL through the cookbook's `rl.train` loop, over any environment (`envs`): verifiable rewards (`env=math`,
arithmetic, reasoning_gym, code), multi-turn games and tool use, and (`task=rubric`) judged conversations.

The environment makes the problems, the env of one rollout and the results row; this method writes the problems
to the run's logs, hands the cookbook its dataset builder, and evaluates base and trained model the same way:
each held-out problem played once in the same env (`evaluation.episodes`).
"""

from __future__ import annotations

import math
from collections.abc import Coroutine, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal, Protocol

import chz

from posttrain.config.checks import at_least, between, not_blank
from posttrain.config.run import RunSettings
from posttrain.errors import ConfigError
from posttrain.pipeline.data import LoadedData
from posttrain.pipeline.envs import registry
from posttrain.pipeline.envs.spec import parse_env
from posttrain.pipeline.methods import warm_start
from posttrain.pipeline.methods.base import RunContext, TrainingStage
from posttrain.pipeline.scoring import verifiers
from posttrain.pipeline.scoring.grading import ANSWER_INSTRUCTION
from posttrain.pipeline.setup.plan import TokenBudget, partner_tokens, sequential_turns
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


# The RL losses both Tinker and the local engine implement that the RL loop takes (tinker.types.LossFnType,
# less `custom`, which is client-side).
RLLossFn = Literal["importance_sampling", "ppo", "cispo", "dro", "gspo", "stable_reinforce"]
# env=game:tic_tac_toe's opponent: a random free cell (seeded); win-or-block, else random; minimax; or the policy
# itself in training (self-play; evaluated against the random opponent).
GameOpponent = Literal["random", "blocker", "optimal", "self"]
# How question/answer data is graded (scoring.GRADERS): the math grader, or for factual answers exact match / token F1.
AnswerGrader = Literal["math", "exact_match", "f1"]
# env=tools:search's retriever: embeddings in a Chroma index, or BM25 (no embedding model).
SearchRetriever = Literal["chroma", "bm25"]


@chz.chz
class EvalSamplingOptions:
    """How held-out answers are sampled (the same for the base and the trained model)."""

    max_tokens: int = chz.field(default=256, doc="max sampled tokens per completion")
    eval_temperature: float = chz.field(default=0.0, doc="sampling temperature for evaluation (0: greedy)")

    @staticmethod
    def check(cfg: Any) -> None:
        at_least("max_tokens", cfg.max_tokens, 1)
        between("eval_temperature", cfg.eval_temperature, 0, 2)


@chz.chz
class TemperatureOptions:
    temperature: float = chz.field(
        default=1.0, doc="sampling temperature of training rollouts (and of teachers)"
    )

    @staticmethod
    def check(cfg: Any) -> None:
        if not (isinstance(cfg.temperature, int | float) and 0 < cfg.temperature <= 2):
            raise ConfigError(f"temperature={cfg.temperature!r} is not valid; expected a number in (0, 2]")


@chz.chz
class RolloutOptions:
    """What the cookbook's `rl.train.Config` takes besides the run's settings."""

    group_size: int = chz.field(default=8, doc="RL rollouts per problem")
    loss_fn: RLLossFn = chz.field(
        default="importance_sampling", doc="importance_sampling|ppo|cispo|dro|gspo|stable_reinforce"
    )
    kl_penalty_coef: float | None = chz.field(
        default=None,
        doc="KL penalty against the reference policy (None: the loop's own default, 0 for RL, 1 for on-policy "
        "distillation, whose reward is that KL)",
    )
    kl_discount_factor: float = chz.field(default=0.0, doc="discount of the KL penalty over later tokens")
    num_substeps: int = chz.field(default=1, doc="optimizer steps per batch of rollouts")

    @staticmethod
    def check(cfg: Any) -> None:
        if isinstance(cfg.group_size, bool) or not isinstance(cfg.group_size, int) or cfg.group_size < 2:
            raise ConfigError(
                f"group_size={cfg.group_size!r} is not valid; expected an integer >= 2 (RL advantages compare "
                "rollouts within a group)"
            )
        if cfg.kl_penalty_coef is not None:
            at_least("kl_penalty_coef", cfg.kl_penalty_coef, 0)
        between("kl_discount_factor", cfg.kl_discount_factor, 0, 1)
        at_least("num_substeps", cfg.num_substeps, 1)
        if cfg.batch_size % cfg.num_substeps:
            raise ConfigError(f"num_substeps={cfg.num_substeps} must divide batch_size={cfg.batch_size}")


@chz.chz
class RLLoopOptions:
    """What only the cookbook's `rl.train.Config` takes (RL, rubrics, RLHF's RL stage; not on-policy distillation)."""

    remove_constant_reward_groups: bool = chz.field(
        default=False, doc="drop groups whose rollouts all got the same reward (no advantage to learn from)"
    )
    max_steps_off_policy: int | None = chz.field(
        default=None,
        doc="asynchronous RL (the cookbook's AsyncConfig): sample with weights up to this many steps old "
        "(None: synchronous)",
    )
    num_minibatches: int | None = chz.field(
        default=None,
        doc="stream each batch to training in this many minibatches as its rollouts finish (the cookbook's "
        "StreamMinibatchConfig; None: whole batches)",
    )

    @staticmethod
    def check(cfg: Any) -> None:
        if cfg.max_steps_off_policy is not None:
            at_least("max_steps_off_policy", cfg.max_steps_off_policy, 0)
        if cfg.num_minibatches is not None:
            at_least("num_minibatches", cfg.num_minibatches, 1)
            if cfg.batch_size % cfg.num_minibatches:
                raise ConfigError(
                    f"num_minibatches={cfg.num_minibatches} must divide batch_size={cfg.batch_size}"
                )
        if cfg.max_steps_off_policy is not None and cfg.num_minibatches is not None:
            raise ConfigError("max_steps_off_policy and num_minibatches do not go together; choose one")


@chz.chz
class EnvOptions:
    env: str | None = chz.field(
        default=None, doc="RL environment: " + "|".join(registry.CHOICES) + " (tools: add :max_turns=N)"
    )
    game_opponent: GameOpponent | None = chz.field(
        default=None,
        doc="env=game:tic_tac_toe: the opponent, random|blocker|optimal, or self: the policy plays both seats in "
        "training (the cookbook's text_arena self-play) and is evaluated against random (None: random)",
    )
    grader: AnswerGrader | None = chz.field(
        default=None,
        doc="question/answer data: math|exact_match|f1 (None: from the data: math when the answers are numbers, "
        "expressions or LaTeX, else f1, the token F1 as the reward with exact match as `correct`)",
    )
    verifiers_args: str | None = chz.field(
        default=None,
        doc="env=verifiers:NAME: the arguments of its load_environment, key=value,... (values JSON where they "
        "parse) or a JSON object",
    )

    @staticmethod
    def check(cfg: Any) -> None:
        not_blank(cfg, "env")
        if cfg.env is not None:
            registry.check(cfg.env)
        # Its grammar is checked where the environment loads (`envs.verifiers_env`), still before anything starts.
        if cfg.verifiers_args is not None and (cfg.env is None or parse_env(cfg.env).name != "verifiers"):
            where = f", not env={cfg.env}" if cfg.env is not None else ""
            raise ConfigError(f"verifiers_args is only used by env=verifiers:NAME{where}; leave it out")
        if cfg.game_opponent is not None and cfg.env != "game:tic_tac_toe":
            raise ConfigError(
                f"game_opponent is only used by env=game:tic_tac_toe, not env={cfg.env}; leave it out"
            )
        if cfg.game_opponent == "self":
            group_size = getattr(cfg, "group_size", None)
            if group_size is None or getattr(cfg, "teacher_model", None) is not None:
                raise ConfigError("game_opponent=self is only used by task=rl (self-play trains both seats)")
            if group_size % 2:
                raise ConfigError(
                    f"game_opponent=self needs an even group_size (each game fills two seats), got {group_size}"
                )


@chz.chz
class SearchOptions:
    """Task=rl only: the search tool's corpus is what the policy searches while it trains and is evaluated;
    distillation takes an environment's prompts, never its tools."""

    corpus: str | None = chz.field(
        default=None,
        doc="env=tools:search: your passages, a JSONL file (text, optional id and title), searched to answer the "
        "questions of dataset= (None: the shipped corpus and its own questions)",
    )
    retriever: SearchRetriever | None = chz.field(
        default=None,
        doc="env=tools:search: chroma (all-MiniLM-L6-v2 embeddings, index cached by the corpus's hash) or bm25 "
        "(None: chroma with corpus=, else bm25)",
    )

    @staticmethod
    def check(cfg: Any) -> None:
        not_blank(cfg, "corpus")
        for name in ("corpus", "retriever"):
            if getattr(cfg, name) is not None and (
                cfg.env is None or parse_env(cfg.env).key != "tools:search"
            ):
                where = f", not env={cfg.env}" if cfg.env is not None else ""
                raise ConfigError(f"{name} is only used by env=tools:search{where}; leave it out")
        if cfg.corpus is not None and not Path(cfg.corpus).expanduser().is_file():
            raise ConfigError(f"corpus={cfg.corpus}: no such file")

    @staticmethod
    def chosen(cfg: Any) -> dict[str, Any]:
        """The retriever env=tools:search runs with when none is given (`settings.method_config` fills it in), so
        that summary.json's hyperparameters record it rather than None."""
        if cfg.retriever is None and cfg.env is not None and parse_env(cfg.env).key == "tools:search":
            return {"retriever": "chroma" if cfg.corpus is not None else "bm25"}
        return {}


@chz.chz
class PartnerOptions:
    partner_model: str | None = chz.field(
        default=None,
        doc="env=game:twenty_questions: the answerer, a model the backend serves by name, never trained (None: the "
        "base model itself)",
    )

    @staticmethod
    def check(cfg: Any) -> None:
        not_blank(cfg, "partner_model")
        if cfg.partner_model is not None and cfg.partner_model.startswith("tinker://"):
            raise ConfigError(
                f"partner_model={cfg.partner_model}: the partner must be a model the backend serves by name, not a "
                "checkpoint (the other player is never trained)"
            )


@chz.chz
class RewardOptions:
    reward_fn: str | None = chz.field(
        default=None,
        doc="RL: your own verifier, path/to/file.py:function (gets the problem row and the completion, returns a float)",
    )

    @staticmethod
    def check(cfg: Any) -> None:
        not_blank(cfg, "reward_fn")


@chz.chz
class VerifierOptions:
    verifier_timeout: float = chz.field(
        default=10.0, doc="seconds one call of your function may take; a slower call is stopped and scores 0"
    )

    @staticmethod
    def check(cfg: Any) -> None:
        timeout = cfg.verifier_timeout
        if isinstance(timeout, bool) or not (isinstance(timeout, int | float) and 0 < timeout <= 3600):
            raise ConfigError(f"verifier_timeout={timeout!r} is not valid; expected seconds in (0, 3600]")


@chz.chz
class RLConfig(
    RunSettings,
    EvalSamplingOptions,
    TemperatureOptions,
    RolloutOptions,
    RLLoopOptions,
    EnvOptions,
    SearchOptions,
    PartnerOptions,
    RewardOptions,
    VerifierOptions,
    warm_start.WarmStartOptions,
):
    """Every setting of task=rl."""


def rollout_settings(cfg: Any, reference: str | None = None) -> dict[str, Any]:
    """The sampling, loss and loop settings of an `rl.train` Config (RL, rubrics, RLHF's last stage). A KL
    penalty is taken against the base model, or against `reference` (a sampler checkpoint of it)."""
    from tinker_cookbook.rl.train import AsyncConfig, KLReferenceConfig, StreamMinibatchConfig

    kl = cfg.kl_penalty_coef or 0.0
    settings = dict(
        max_tokens=cfg.max_tokens,
        temperature=cfg.temperature,
        loss_fn=cfg.loss_fn,
        max_steps=cfg.max_steps,
        kl_penalty_coef=kl,
        kl_discount_factor=cfg.kl_discount_factor,
        num_substeps=cfg.num_substeps,
        remove_constant_reward_groups=cfg.remove_constant_reward_groups,
    )
    if kl > 0:
        settings["kl_reference_config"] = KLReferenceConfig(
            base_model=cfg.model_name, load_checkpoint_path=reference
        )
    if cfg.max_steps_off_policy is not None:
        settings["async_config"] = AsyncConfig(
            max_steps_off_policy=cfg.max_steps_off_policy,
            groups_per_batch=cfg.batch_size,
            loss_fn=cfg.loss_fn,
        )
    if cfg.num_minibatches is not None:
        settings["stream_minibatch_config"] = StreamMinibatchConfig(
            groups_per_batch=cfg.batch_size, num_minibatches=cfg.num_minibatches
        )
    return settings


class RL:
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
        self.environment = registry.environment(self.spec)
        if getattr(cfg, "grader", None) is not None and registry.lookup(self.spec) != registry.DEFAULT:
            raise ConfigError(
                f"grader is only used with question/answer data (env=math), not env={self.spec}; leave it out"
            )
        if cfg.reward_fn is not None and not self.environment.takes_verifier:
            raise ConfigError(f"reward_fn= does not apply to env={self.spec}: the game decides the reward")
        self.partner = self._partner(cfg)
        self.warm_start_steps = warm_start.checked_steps(cfg, self.environment, self.spec)
        self.warm: warm_start.WarmStart | None = None
        self.problems: ProblemSet = self.environment.problems(self.spec, cfg, data)
        if not self.problems.train or not self.problems.eval:
            raise ConfigError("RL needs at least one training and one evaluation problem")
        if judging is not None:
            self.extra_models = judging.extra_models(cfg)
        if self.partner is not None and self.partner != cfg.model_name:
            self.extra_models = (*self.extra_models, self.partner)
        # An environment's data may name its own score (e.g. the QA data's grader).
        label = self.problems.info.get("score_label", self.environment.score_label)
        self.score_label = "mean reward (user verifier)" if cfg.reward_fn else label
        if judging is not None:
            self.score_label = f"{self.score_label} (judged by {judging.model})"
        self.rows: dict[str, list[RLExample]] = {}
        self.extra_scores: dict[str, dict[str, float]] = {}

    def _partner(self, cfg: Any) -> str | None:
        """The model that plays the environment's other side (twenty questions' answerer), if it has one."""
        given = getattr(cfg, "partner_model", None)
        if not registry.takes_partner(self.spec):
            if given is not None:
                raise ConfigError(
                    f"partner_model is only used by env=game:twenty_questions, not env={self.spec}; leave it out"
                )
            return None
        return given or cfg.model_name

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
        partner = self._partner_settings(ctx) if self.partner is not None else {}
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

    def _partner_settings(self, ctx: RunContext) -> dict[str, Any]:
        """The partner's model and renderer."""
        from posttrain.pipeline.setup import preflight

        assert self.partner is not None
        policy = (self.cfg.model_name, ctx.renderer_name)
        renderer, source = preflight.answering_renderer(self.partner, policy, "it answers in a few tokens")
        same = " (the base model itself, never trained)" if self.partner == self.cfg.model_name else ""
        ctx.say(f"partner: {self.partner}{same}, greedy, renderer {renderer} ({source})")
        self.partner_renderer = renderer
        return {"partner_model": self.partner, "partner_renderer_name": renderer}

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
        # Multi-turn: at most max_turns turns, each re-reading the conversation so far; an environment's reply is
        # counted like a turn of max_tokens. One turn: the single-turn formulas.
        turns = self.environment.max_turns(self.spec)
        trajectory = prompt + (2 * turns - 1) * cfg.max_tokens
        rollouts = self.total_steps * cfg.batch_size * cfg.group_size
        episodes = rollouts + 2 * len(self.problems.eval)
        notes = [f"upper bound: every completion counted at max_tokens={cfg.max_tokens}"]
        # what a turn reads, on average: midway through a game
        context = prompt + (turns - 1) * cfg.max_tokens
        in_a_row = None
        if turns > 1:
            in_a_row = sequential_turns(
                cfg,
                turns,
                self.total_steps,
                len(self.problems.eval),
                self.partner is not None,
                round(context),
            )
            notes += [f"upper bound: every episode counted at {turns} turns", in_a_row.note()]
        budget = TokenBudget(
            train=round(rollouts * trajectory),
            prefill=round(episodes * turns * context),
            sample=episodes * turns * cfg.max_tokens,
            train_steps=self.total_steps,
            sequences_per_step=cfg.batch_size * cfg.group_size,
            mean_train_length=trajectory,
            notes=notes,
            turns=in_a_row,
        )
        if self.partner is not None:
            budget = partner_tokens(budget, self.partner, episodes * turns, prompt + cfg.max_tokens)
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
            extra |= {
                "partner_model": self.partner,
                "partner_renderer": getattr(self, "partner_renderer", None),
            }
        if self.warm is not None:
            extra["warm_start"] = self.warm.summary()
        return dataset, sizes, extra
