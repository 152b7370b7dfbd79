"""RL with verifiable rewards, through the cookbook's `rl.train` loop.

Problems come from `problems` (a question/answer dataset, code problems, or a generator chosen by `env=`); the
reward and the evaluation score answers the same way (`scoring`: graders, sandboxed tests, or the user's
`reward_fn=`). Evaluation: one sampled answer per held-out problem with the training prompt, scored as accuracy
(mean fraction of tests passed for code, mean reward with a user verifier). Games (`env=game:NAME`) are
multi-turn: the cookbook's env classes, evaluated as the win rate over held-out games. Tool use
(`env=tools:NAME`, `tool_envs`) is multi-turn too: the cookbook's tool-agent env, evaluated as the accuracy of
the final answers on held-out problems.
"""

from __future__ import annotations

import math
from collections.abc import Coroutine, Mapping
from typing import TYPE_CHECKING, Any, ClassVar

from posttrain.config import TrainConfig
from posttrain.errors import ConfigError
from posttrain.pipeline.data import LoadedData
from posttrain.pipeline.envs.registry import load_problems
from posttrain.pipeline.methods.base import RunContext
from posttrain.pipeline.scoring import verifiers
from posttrain.pipeline.scoring.grading import ANSWER_INSTRUCTION
from posttrain.pipeline.setup.plan import TokenBudget
from posttrain.util import write_jsonl

if TYPE_CHECKING:
    import tinker


class RL:
    name: ClassVar[str] = "rl"
    metric: ClassVar = "score"
    score_label: ClassVar[str] = "accuracy"
    extra_models: tuple[str, ...] = ()

    def __init__(self, cfg: TrainConfig, data: LoadedData | None):
        self.game = (cfg.env or "").startswith("game:")
        self.tools = (cfg.env or "").startswith("tools:")
        self.max_turns = 0
        if self.tools:
            from posttrain.pipeline.envs import tools as tool_tasks
            from posttrain.pipeline.setup import preflight

            spec = (cfg.env or "").split(":", 1)[1]
            self.max_turns = tool_tasks.parse_spec(spec).max_turns
            # A renderer with no tool-call format is refused now, before the engine starts.
            tool_tasks.check_renderer(preflight.resolve_renderer(cfg.model_name, cfg.renderer_name)[0], spec)
        if cfg.reward_fn is not None:
            if self.game:
                raise ConfigError(
                    "reward_fn= does not apply to games (env=game:...): the game decides the reward"
                )
            verifiers.load(cfg.reward_fn)  # a missing file or function is reported now, in one line
        self.problems = load_problems(cfg, data)
        self.extra_scores: dict[str, dict[str, float]] = {}
        code = any(p.get("grader") in ("code", "humaneval") for p in self.problems.eval[:1])
        if cfg.reward_fn is not None:
            self.score_label = "mean reward (user verifier)"
        elif self.game:
            self.score_label = "win rate"
        elif code:
            self.score_label = "pass rate (fraction of tests passed)"

    def prepare(self, ctx: RunContext) -> None:
        from posttrain.pipeline.envs.dataset import GameFileBuilder, ProblemFileBuilder, make_scorer

        self.ctx = ctx
        cfg = ctx.cfg
        problems_file = ctx.data_dir / "train_problems.jsonl"
        write_jsonl(problems_file, self.problems.train)
        write_jsonl(ctx.data_dir / "eval_problems.jsonl", self.problems.eval)
        n_batches = cfg.max_steps or math.ceil(len(self.problems.train) / cfg.batch_size) * cfg.num_epochs
        self.total_steps = n_batches
        self.errors_file = ctx.log_path / verifiers.ERRORS_FILE
        self.scorer = make_scorer(cfg.reward_fn, str(self.errors_file), cfg.verifier_timeout)
        common = dict(
            rows_file=str(problems_file),
            model_name_for_tokenizer=cfg.model_name,
            renderer_name=ctx.renderer_name,
            groups_per_batch=cfg.batch_size,
            group_size=cfg.group_size,
            n_batches=n_batches,
            seed=cfg.seed,
        )
        if self.game:
            self.builder: Any = GameFileBuilder(**common, game=(cfg.env or "").split(":", 1)[1])
        elif self.tools:
            from posttrain.pipeline.envs.tools.agent import ToolProblemFileBuilder, initial_messages

            initial_messages(self.problems.eval[0], ctx.renderer)  # a renderer without tool calls: one line
            self.builder = ToolProblemFileBuilder(
                **common,
                max_turns=self.max_turns,
                reward_fn=cfg.reward_fn,
                verifier_errors_file=str(self.errors_file),
                verifier_timeout=cfg.verifier_timeout,
            )
        else:
            self.builder = ProblemFileBuilder(
                **common,
                reward_fn=cfg.reward_fn,
                verifier_errors_file=str(self.errors_file),
                verifier_timeout=cfg.verifier_timeout,
            )

    async def evaluate(self, client: tinker.SamplingClient, label: str) -> tuple[list[Any], float]:
        from posttrain.pipeline.evaluation.episodes import (
            SamplingSettings,
            evaluate_accuracy,
            evaluate_games,
            evaluate_tool_use,
        )

        cfg = self.ctx.cfg
        settings = SamplingSettings(
            max_tokens=cfg.max_tokens, temperature=cfg.eval_temperature, seed=cfg.seed
        )
        if self.game:
            return await evaluate_games(
                client, self.problems.eval, self.ctx.renderer, settings, cfg.eval_concurrency, label
            )
        if self.tools:
            return await evaluate_tool_use(
                client, self.problems.eval, self.ctx.renderer, settings, cfg.eval_concurrency, label,
                self.scorer, self.max_turns, label,
            )  # fmt: skip
        result = await evaluate_accuracy(
            client,
            self.problems.eval,
            self.ctx.renderer,
            ANSWER_INSTRUCTION,
            settings,
            cfg.eval_concurrency,
            label,
            self.scorer,
            label,
        )
        # Further held-out sets (HumanEval for env=code:humaneval): the same prompt, sampling and scoring,
        # reported beside the main score; their rows are kept in the logs.
        for name, problems in self.problems.extra_eval.items():
            rows, score = await evaluate_accuracy(
                client, problems, self.ctx.renderer, ANSWER_INSTRUCTION, settings, cfg.eval_concurrency,
                f"{label}: {name}", self.scorer, label,
            )  # fmt: skip
            write_jsonl(
                self.ctx.data_dir / f"{name}_{label.replace(' ', '_')}.jsonl", [r.to_dict() for r in rows]
            )
            self.extra_scores.setdefault(name, {})[label] = score
            self.ctx.say(f"{label}: {name}: {score:.1%}")
        return result

    def train(self) -> Coroutine[Any, Any, Any]:
        from tinker_cookbook.rl import train as rl_train

        config = rl_train.Config(
            **self.ctx.loop_settings(),
            **self.ctx.rl_settings(),
            recipe_name="posttrain_rl",
            dataset_builder=self.builder,
        )
        return rl_train.main(config)

    def token_budget(self) -> TokenBudget:
        from posttrain.pipeline.envs.dataset import prompt_messages

        cfg, renderer = self.ctx.cfg, self.ctx.renderer
        problems = self.problems.train[:200] + self.problems.eval[:200]
        if self.tools:
            from posttrain.pipeline.envs.tools.agent import initial_messages

            def messages(p: dict) -> list:
                return initial_messages(p, renderer)
        else:
            messages = prompt_messages
        prompt = sum(renderer.build_generation_prompt(messages(p)).length for p in problems) / len(problems)
        # Multi-turn tool use: at most max_turns turns, each re-reading the conversation so far; a tool reply
        # is counted like a turn of max_tokens. One turn: the single-turn formulas.
        turns = max(1, self.max_turns)
        trajectory = prompt + (2 * turns - 1) * cfg.max_tokens
        mean_turn_prompt = prompt + (turns - 1) * cfg.max_tokens
        rollouts = self.total_steps * cfg.batch_size * cfg.group_size
        evals = 2 * len(self.problems.eval)
        notes = [f"upper bound: every completion counted at max_tokens={cfg.max_tokens}"]
        if self.tools:
            notes.append(f"upper bound: every episode counted at max_turns={turns} turns")
        return TokenBudget(
            train=round(rollouts * trajectory),
            prefill=round((rollouts + evals) * turns * mean_turn_prompt),
            sample=(rollouts + evals) * turns * cfg.max_tokens,
            train_steps=self.total_steps,
            sequences_per_step=cfg.batch_size * cfg.group_size,
            mean_train_length=trajectory,
            notes=notes,
        )

    def score_text(self, value: float) -> str:
        what = "games" if self.game else "problems"
        return f"{self.score_label} {value:.1%} on {len(self.problems.eval)} held-out {what}"

    def describe(self) -> tuple[Mapping[str, Any], Mapping[str, int], Mapping[str, Any]]:
        sizes = {
            "train_problems": len(self.problems.train),
            "eval_problems": len(self.problems.eval),
            "group_size": self.ctx.cfg.group_size,
        }
        dataset = {**self.problems.info, "env": self.ctx.cfg.env or "math"}
        extra: dict[str, Any] = {"answer_instruction": ANSWER_INSTRUCTION, "score_label": self.score_label}
        for name, scores in self.extra_scores.items():
            extra[f"{name}_score"] = {
                "baseline": scores.get("base model"),
                "trained": scores.get("trained model"),
            }
        if self.ctx.cfg.reward_fn is not None:
            counts = verifiers.error_counts(self.errors_file)
            extra["reward_fn"] = self.ctx.cfg.reward_fn
            extra["verifier_errors"] = {
                "count": sum(v for k, v in counts.items() if k != "first"),
                "by_phase": {k: v for k, v in counts.items() if k != "first"},
                "first": counts.get("first"),
                "log": str(self.errors_file),
            }
        return dataset, sizes, extra
