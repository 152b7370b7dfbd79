"""RL with verifiable rewards, through the cookbook's `rl.train` loop.

Problems come from `problems` (a question/answer dataset, or a generator chosen by `env=`); the reward and the
evaluation grade answers the same way (`grading`). Evaluation: one sampled answer per held-out problem with the
training prompt, scored as accuracy.
"""

from __future__ import annotations

import math
from collections.abc import Coroutine, Mapping
from typing import TYPE_CHECKING, Any, ClassVar

from posttrain.config import TrainConfig
from posttrain.pipeline.data import LoadedData
from posttrain.pipeline.grading import ANSWER_INSTRUCTION
from posttrain.pipeline.methods.base import RunContext
from posttrain.pipeline.plan import TokenBudget
from posttrain.pipeline.problems import load_problems
from posttrain.util import write_jsonl

if TYPE_CHECKING:
    import tinker


class RL:
    name: ClassVar[str] = "rl"
    metric: ClassVar = "score"
    score_label: ClassVar[str] = "accuracy"
    extra_models: tuple[str, ...] = ()

    def __init__(self, cfg: TrainConfig, data: LoadedData | None):
        self.problems = load_problems(cfg, data)

    def prepare(self, ctx: RunContext) -> None:
        from posttrain.pipeline.rl_envs import ProblemFileBuilder

        self.ctx = ctx
        cfg = ctx.cfg
        problems_file = ctx.data_dir / "train_problems.jsonl"
        write_jsonl(problems_file, self.problems.train)
        write_jsonl(ctx.data_dir / "eval_problems.jsonl", self.problems.eval)
        n_batches = cfg.max_steps or math.ceil(len(self.problems.train) / cfg.batch_size) * cfg.num_epochs
        self.total_steps = n_batches
        self.builder = ProblemFileBuilder(
            problems_file=str(problems_file),
            model_name_for_tokenizer=cfg.model_name,
            renderer_name=ctx.renderer_name,
            groups_per_batch=cfg.batch_size,
            group_size=cfg.group_size,
            n_batches=n_batches,
            seed=cfg.seed,
        )

    async def evaluate(self, client: tinker.SamplingClient, label: str) -> tuple[list[Any], float]:
        from posttrain.pipeline.evaluation import SamplingSettings, evaluate_accuracy

        cfg = self.ctx.cfg
        settings = SamplingSettings(
            max_tokens=cfg.max_tokens, temperature=cfg.eval_temperature, seed=cfg.seed
        )
        return await evaluate_accuracy(
            client,
            self.problems.eval,
            self.ctx.renderer,
            ANSWER_INSTRUCTION,
            settings,
            cfg.eval_concurrency,
            label,
        )

    def train(self) -> Coroutine[Any, Any, Any]:
        from tinker_cookbook.rl import train as rl_train

        cfg = self.ctx.cfg
        config = rl_train.Config(
            **self.ctx.loop_settings(),
            recipe_name="posttrain_rl",
            dataset_builder=self.builder,
            max_tokens=cfg.max_tokens,
            temperature=cfg.temperature,
            loss_fn=cfg.loss_fn,
            kl_penalty_coef=cfg.kl_penalty_coef,
            max_steps=cfg.max_steps,
        )
        return rl_train.main(config)

    def token_budget(self) -> TokenBudget:
        from posttrain.pipeline.rl_envs import prompt_messages

        cfg, renderer = self.ctx.cfg, self.ctx.renderer
        problems = self.problems.train[:200] + self.problems.eval[:200]
        prompt = sum(renderer.build_generation_prompt(prompt_messages(p)).length for p in problems) / len(
            problems
        )
        rollouts = self.total_steps * cfg.batch_size * cfg.group_size
        evals = 2 * len(self.problems.eval)
        return TokenBudget(
            train=round(rollouts * (prompt + cfg.max_tokens)),
            prefill=round((rollouts + evals) * prompt),
            sample=(rollouts + evals) * cfg.max_tokens,
            train_steps=self.total_steps,
            sequences_per_step=cfg.batch_size * cfg.group_size,
            mean_train_length=prompt + cfg.max_tokens,
            notes=[f"upper bound: every completion counted at max_tokens={cfg.max_tokens}"],
        )

    def score_text(self, value: float) -> str:
        return f"accuracy {value:.1%} on {len(self.problems.eval)} held-out problems"

    def describe(self) -> tuple[Mapping[str, Any], Mapping[str, int], Mapping[str, Any]]:
        sizes = {
            "train_problems": len(self.problems.train),
            "eval_problems": len(self.problems.eval),
            "group_size": self.ctx.cfg.group_size,
        }
        dataset = {**self.problems.info, "env": self.ctx.cfg.env or "math"}
        return dataset, sizes, {"answer_instruction": ANSWER_INSTRUCTION}
