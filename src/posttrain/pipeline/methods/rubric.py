"""RL against LLM-judged rubrics (`task=rubric`): the RL method over the rubric environment (`envs.rubric`), with
a judge (`grader_model=`, default the base model itself; `grader_mode=probability|sampled`).

Evaluation: one greedy reply per held-out conversation, judged by the same judge, for the base and the trained
model alike; the score is the mean judged score. The scores are judgements, and the results say so:
`score_kind: "judged"`, the judge's name in the headline, each item's score and the raw verdict in the rows.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, ClassVar, Self

import chz

from posttrain.config.checks import not_blank
from posttrain.config.parse import to_dict
from posttrain.config.run import RunSettings
from posttrain.errors import ConfigError
from posttrain.pipeline.data import LoadedData
from posttrain.pipeline.methods.options import (
    EvalSamplingOptions,
    RLLoopOptions,
    RolloutOptions,
    TemperatureOptions,
)
from posttrain.pipeline.methods.rl import RL, RLConfig
from posttrain.pipeline.scoring.judge import GraderMode
from posttrain.pipeline.setup.plan import TokenBudget

if TYPE_CHECKING:
    from posttrain.pipeline.envs.base import ProblemSet
    from posttrain.pipeline.methods.base import RunContext

# The cookbook grader prompt's own words around the conversation, reply and criterion, in tokens (about 100
# with the SmolLM2 tokenizer).
GRADER_PROMPT_OVERHEAD = 100
SAMPLED_VERDICT_TOKENS = 128


@chz.chz
class GraderOptions:
    """The judge model: task=rubric's, and task=pairwise_rl's with preference_model=judge."""

    grader_model: str | None = chz.field(
        default=None,
        doc="rubric: the model that judges each response against each rubric item; pairwise_rl: the judge of "
        "preference_model=judge. Any model the backend serves (None: the base model itself; never trained)",
    )

    @staticmethod
    def check(cfg: Any) -> None:
        not_blank(cfg, "grader_model")


@chz.chz
class RubricOptions(GraderOptions):
    grader_mode: GraderMode | None = chz.field(
        default=None,
        doc="rubric: probability|sampled (None: probability, the grader's P(Yes) per item; sampled: the "
        "cookbook's <score>...</score> answer)",
    )


@chz.chz
class RubricConfig(
    RunSettings, EvalSamplingOptions, TemperatureOptions, RolloutOptions, RLLoopOptions, RubricOptions
):
    """Every setting of task=rubric."""


@dataclass
class Judging:
    """The judge of a rubric run: a served base model, how its answer is read, and (once prepared) its renderer."""

    model: str
    mode: str
    renderer: str = ""
    method: ClassVar[str] = "rubric"
    env: ClassVar[str] = "rubric"
    choices: list[str] = field(default_factory=list)  # how the renderer was chosen, for the terminal

    @classmethod
    def from_config(cls, cfg: Any) -> Self:
        model = cfg.grader_model or cfg.model_name
        if model.startswith("tinker://"):
            raise ConfigError(
                f"grader_model={model}: the grader must be a model the backend serves by name, not a checkpoint "
                "(the judge is never a trained model)"
            )
        # task=pairwise_rl has no grader_mode: its judge is read by probability only.
        return cls(model, getattr(cfg, "grader_mode", None) or "probability")

    def extra_models(self, cfg: RLConfig) -> tuple[str, ...]:
        return (self.model,) if self.model != cfg.model_name else ()

    def settings(self, ctx: RunContext) -> dict[str, Any]:
        """The judge's part of the episode settings; says which judge, scoring and renderer."""
        from posttrain.config.renderers import answering_renderer

        # P(Yes) is read at the reply's first token: a thinking judge would start with <think> there.
        why = "the reply starts with the answer" if self.mode == "probability" else None
        renderer, source = answering_renderer(self.model, (ctx.cfg.model_name, ctx.renderer_name), why)
        self.renderer = renderer
        same = " (the base model itself)" if self.model == ctx.cfg.model_name else ""
        ctx.say(f"grader: {self.model}{same}, {self.mode} scoring, renderer {renderer} ({source})")
        return {"grader_model": self.model, "grader_renderer_name": renderer, "grader_mode": self.mode}

    def add_judge_tokens(
        self, budget: TokenBudget, problems: ProblemSet, prompt: float, cfg: RLConfig
    ) -> TokenBudget:
        """Each judgement reads the conversation, the reply and the criterion; probability scoring asks twice."""
        rows = problems.train[:200] + problems.eval[:200]
        items = sum(len(r["rubric"]) for r in rows) / len(rows)
        per_item = (prompt + cfg.max_tokens + GRADER_PROMPT_OVERHEAD) * (
            2 if self.mode == "probability" else 1
        )
        replies = budget.train_steps * cfg.batch_size * cfg.group_size + 2 * len(problems.eval)
        verdicts = replies * items * (0 if self.mode == "probability" else SAMPLED_VERDICT_TOKENS)
        note = f"grader {self.model}: {items:.1f} items per reply, {self.mode} scoring"
        return replace(
            budget,
            prefill=round(budget.prefill + replies * items * per_item),
            sample=round(budget.sample + verdicts),
            notes=[*budget.notes, note],
        )

    def summary(self) -> dict[str, Any]:
        return {
            "score_kind": "judged",
            "score_note": (
                f"Scores are judged by {self.model} ({self.mode} scoring), not verified: a judge can be wrong, and "
                "the policy is trained to please this judge."
            ),
            "grader_model": self.model,
            "grader_mode": self.mode,
            "grader_renderer": self.renderer,
        }


def rubric(cfg: RubricConfig, data: LoadedData | None) -> RL:
    """The RL method over the rubric environment, judged as `cfg` says."""
    settings = to_dict(cfg, chz.chz_fields(RLConfig))
    return RL(RLConfig(**settings), data, Judging.from_config(cfg))
