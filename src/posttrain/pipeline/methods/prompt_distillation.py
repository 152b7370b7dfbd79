"""Prompt distillation: bake a system prompt into the weights (the cookbook's prompt_distillation recipe shape).

The teacher is the base model WITH `system_prompt`; it answers the prompts, and the student (the same model
WITHOUT the system prompt) is trained on those answers with the cookbook's supervised loop, so that it behaves
as if the prompt were there. Traces are kept in the log folder as for off-policy distillation.

Evaluation: the NLL of the teacher's held-out answers (as distillation), and the behaviour itself: greedy
answers to the held-out prompts without the system prompt, compared with the teacher's greedy answers with it.
`behaviour_agreement` is the fraction of prompts whose answer starts with the same first words
(BEHAVIOUR_WORDS, case and punctuation ignored), which is what a style or format instruction changes first;
the answers are kept (data/behaviour_*.jsonl). First words are a crude proxy: with `behaviour_check=` the
user's function judges each answer for the property the prompt asks for (in French, one sentence, ...), and the
rate at which the teacher (with the prompt), the base model and the trained model (without it) show it is the
measure of success: trained ~ teacher, base below.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Coroutine, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import chz

from posttrain.config.checks import not_blank
from posttrain.config.run import RunSettings
from posttrain.errors import ConfigError
from posttrain.pipeline.data import LoadedData
from posttrain.pipeline.evaluation.common import SamplingSettings
from posttrain.pipeline.methods.base import Method, RunContext
from posttrain.pipeline.methods.distillation import summary
from posttrain.pipeline.methods.distillation.prompts import Messages, Share, load_prompts
from posttrain.pipeline.methods.options import EvalSamplingOptions, TemperatureOptions, VerifierOptions
from posttrain.pipeline.methods.sft import SupervisedOptions
from posttrain.pipeline.scoring import verifiers
from posttrain.pipeline.setup.plan import TokenBudget
from posttrain.util import write_jsonl

if TYPE_CHECKING:
    import tinker

BEHAVIOUR_WORDS = 3


@chz.chz
class PromptDistillationOptions:
    system_prompt: str | None = chz.field(
        default=None,
        doc="prompt_distillation: the system prompt to bake into the weights (text, or @path/to/file)",
    )
    behaviour_check: str | None = chz.field(
        default=None,
        doc="prompt_distillation: your check of the prompt's behaviour, path/to/file.py:function (gets the prompt "
        "row and an answer, returns a bool or a float in [0, 1]); rates for teacher, base and trained",
    )

    @staticmethod
    def check(cfg: Any) -> None:
        not_blank(cfg, "system_prompt", "behaviour_check")


@chz.chz
class PromptDistillationConfig(
    RunSettings,
    SupervisedOptions,
    EvalSamplingOptions,
    TemperatureOptions,
    PromptDistillationOptions,
    VerifierOptions,
):
    """Every setting of task=prompt_distillation."""

    @staticmethod
    def when_chosen(cfg: Any) -> None:
        if cfg.system_prompt is None:
            raise ConfigError("task=prompt_distillation needs system_prompt= (the text, or @path/to/file)")


def read_system_prompt(value: str) -> str:
    """`system_prompt=` is the text itself, or `@path` to a file holding it."""
    if value.startswith("@"):
        path = Path(value[1:]).expanduser()
        try:
            value = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError(f"system_prompt={value}: cannot read {path} ({exc.strerror})") from None
    if not value.strip():
        raise ConfigError("system_prompt is empty; give the text or @path/to/file")
    return value.strip()


def first_words(text: str, n: int = BEHAVIOUR_WORDS) -> tuple[str, ...]:
    return tuple(re.findall(r"\w+", text.lower())[:n])


class PromptDistillation(Method):
    name: ClassVar[str] = "prompt_distillation"
    metric: ClassVar = "nll"
    score_label: str = "NLL of the teacher's completions"
    mode = "off_policy"
    extra_models: tuple[str, ...] = ()

    def __init__(self, cfg: PromptDistillationConfig, data: LoadedData | None):
        assert cfg.system_prompt is not None  # the method's own settings check guarantees it
        self.system_prompt = read_system_prompt(cfg.system_prompt)
        self.teacher_model = f"{cfg.model_name} with the system prompt"
        self.prompts = load_prompts(cfg, data, self.name)
        self.shares = (Share(self.teacher_model, self.prompts),)
        self.task_accuracy: dict[str, float] = {}
        self.trace_counts: dict[str, list[int]] = {}
        self.agreement: dict[str, float] = {}
        self.behaviour_rate: dict[str, float] = {}
        self.teacher_greedy: list[str] | None = None
        self.check = None
        if cfg.behaviour_check is not None:  # a missing file or function: one line now, before anything runs
            self.check = verifiers.UserVerifier(
                cfg.behaviour_check, None, cfg.verifier_timeout, "behaviour_check"
            )

    def prepare(self, ctx: RunContext) -> None:
        from posttrain.pipeline.methods.distillation import off_policy
        from posttrain.pipeline.methods.distillation.held_out import HeldOut
        from posttrain.pipeline.methods.distillation.teachers import Teacher, TeacherPool

        self.ctx = ctx
        teacher = Teacher(ctx.cfg.model_name, None, self.system_prompt)  # the base model, with the prompt
        self.pool = TeacherPool(ctx, self.shares, fixed=teacher)
        self.held_out = HeldOut(self.pool)
        self.total_steps = off_policy.steps(len(self.prompts.train), ctx.cfg)
        ctx.say(f"prompt distillation: system prompt ({len(self.system_prompt)} characters) -> the weights")
        if self.check is not None:
            self.check.errors_file = ctx.log_path / verifiers.ERRORS_FILE

    async def _greedy(self, client: tinker.SamplingClient, prompts: list[Messages], desc: str) -> list[str]:
        from posttrain.pipeline.methods.distillation.teachers import sample_completions

        cfg = self.ctx.cfg
        settings = SamplingSettings(cfg.max_tokens, 0.0, cfg.seed, cfg.eval_concurrency)
        return await sample_completions(client, self.ctx.renderer, prompts, settings, desc)

    async def evaluate(self, client: tinker.SamplingClient, label: str) -> tuple[list[Any], float]:
        rows, nll = await self.held_out.nll(client, label)
        self.trace_counts["teacher_eval.jsonl"] = self.held_out.traces.counts if self.held_out.traces else []
        spec, teacher = await self.pool.get(0)
        if self.teacher_greedy is None:
            prompts = [spec.messages(p) for p in self.prompts.eval]
            self.teacher_greedy = await self._greedy(teacher, prompts, "teacher: behaviour")
            await self._save_behaviour("teacher (with the system prompt)", self.teacher_greedy)
        answers = await self._greedy(client, self.prompts.eval, f"{label}: behaviour")
        await self._save_behaviour(label, answers)
        matches = [
            first_words(a) == first_words(t) and bool(first_words(t))
            for a, t in zip(answers, self.teacher_greedy, strict=True)
        ]
        self.agreement[label] = sum(matches) / len(matches) if matches else float("nan")
        self.ctx.say(f"{label}: behaviour agreement with the teacher {self.agreement[label]:.1%}")
        return rows, nll

    def train(self) -> Coroutine[Any, Any, Any]:
        return self._train()

    async def _train(self) -> None:
        from posttrain.pipeline.methods.distillation import off_policy

        await self.held_out.sample()
        traces = await self.pool.answers("train", self.ctx.cfg.seed, "teacher: training prompts")
        self.trace_counts["teacher_train.jsonl"] = traces.counts
        await off_policy.train(self.ctx, self.name)

    def token_budget(self) -> TokenBudget:
        return summary.token_budget(self)  # type: ignore[arg-type]  # the same attributes as distillation's

    def score_text(self, value: float) -> str:
        held_out = self.held_out.traces.rows if self.held_out.traces else []
        return f"held-out NLL of the teacher's completions {value:.4f} on {len(held_out)} prompts"

    async def _save_behaviour(self, label: str, answers: list[str]) -> None:
        rows: list[dict[str, Any]] = [
            {"prompt": p, "answer": a} for p, a in zip(self.prompts.eval, answers, strict=True)
        ]
        if self.check is not None:
            phase = f"behaviour check, {label}"
            scores = await asyncio.gather(
                *(self.check.score({"messages": r["prompt"]}, r["answer"], phase) for r in rows)
            )
            for row, (value, error) in zip(rows, scores, strict=True):
                row["behaviour"] = value
                if error is not None:
                    row["error"] = error
            rate = sum(v for v, _ in scores) / len(scores) if scores else float("nan")
            self.behaviour_rate[label.split()[0]] = rate
            self.ctx.say(
                f"{label}: behaviour ({self.ctx.cfg.behaviour_check}) {rate:.1%} of held-out answers"
            )
        # behaviour_teacher.jsonl, behaviour_base.jsonl, behaviour_trained.jsonl
        write_jsonl(self.ctx.data_dir / f"behaviour_{label.split()[0]}.jsonl", rows)

    def describe(self) -> tuple[Mapping[str, Any], Mapping[str, int], Mapping[str, Any]]:
        dataset, sizes, extra = summary.describe(self)  # type: ignore[arg-type]
        dataset = {k: v for k, v in dataset.items() if k != "distillation_mode"}
        extra = {
            **extra,
            "system_prompt": self.system_prompt,
            "baseline_behaviour_agreement": self.agreement.get("base model"),
            "trained_behaviour_agreement": self.agreement.get("trained model"),
            "behaviour_definition": f"fraction of held-out prompts whose greedy answer without the system prompt "
            f"starts with the same {BEHAVIOUR_WORDS} words as the teacher's greedy answer with it",
        }
        if self.check is not None:
            extra["behaviour_check"] = {
                "function": self.ctx.cfg.behaviour_check,
                "teacher_rate": self.behaviour_rate.get("teacher"),
                "baseline_rate": self.behaviour_rate.get("base"),
                "trained_rate": self.behaviour_rate.get("trained"),
                "definition": "mean of the check over the held-out prompts' greedy answers: the teacher's with "
                "the system prompt, the base and trained model's without it",
                "errors": sum(
                    n
                    for phase, n in verifiers.error_counts(self.check.errors_file).items()
                    if phase != "first"
                )
                if self.check.errors_file
                else 0,
            }
        return dataset, sizes, extra
