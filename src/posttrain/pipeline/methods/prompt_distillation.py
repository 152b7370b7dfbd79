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
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

import tinker

from posttrain.config import TrainConfig
from posttrain.errors import ConfigError
from posttrain.pipeline.data import LoadedData
from posttrain.pipeline.methods.base import RunContext
from posttrain.pipeline.methods.distillation import (
    Distillation,
    Messages,
    Teacher,
    load_prompts,
    sample_completions,
)
from posttrain.pipeline.scoring import verifiers
from posttrain.util import write_jsonl

BEHAVIOUR_WORDS = 3


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


class PromptDistillation(Distillation):
    name: ClassVar[str] = "prompt_distillation"

    def __init__(self, cfg: TrainConfig, data: LoadedData | None):
        assert cfg.system_prompt is not None  # config.check_method_settings guarantees it
        self.system_prompt = read_system_prompt(cfg.system_prompt)
        self.mode = "off_policy"
        self.teacher_model = f"{cfg.model_name} with the system prompt"
        self.prompts = load_prompts(cfg, data, self.name)
        self.extra_models = []
        self.kl: dict[str, float] = {}
        self.n_traces: dict[str, int] = {}
        self.task_accuracy: dict[str, float] = {}
        self.agreement: dict[str, float] = {}
        self.behaviour_rate: dict[str, float] = {}
        self.check = None
        if cfg.behaviour_check is not None:  # a missing file or function: one line now, before anything runs
            self.check = verifiers.UserVerifier(
                cfg.behaviour_check, None, cfg.verifier_timeout, "behaviour_check"
            )

    def prepare(self, ctx: RunContext) -> None:
        super().prepare(ctx)
        ctx.say(f"prompt distillation: system prompt ({len(self.system_prompt)} characters) -> the weights")
        self.teacher_greedy: list[str] | None = None
        if self.check is not None:
            self.check.errors_file = ctx.log_path / verifiers.ERRORS_FILE

    async def teacher(self) -> tuple[Teacher, tinker.SamplingClient]:
        if not hasattr(self, "_teacher"):
            client = await self.ctx.service.create_sampling_client_async(base_model=self.ctx.cfg.model_name)
            self._teacher = Teacher(self.ctx.cfg.model_name, None, self.system_prompt), client
        return self._teacher

    async def _greedy(self, client: tinker.SamplingClient, prompts: list[Messages], desc: str) -> list[str]:
        return await sample_completions(
            client, self.ctx.renderer, prompts, self.ctx.cfg, self.ctx.cfg.seed, desc, temperature=0.0
        )

    async def evaluate(self, client: tinker.SamplingClient, label: str) -> tuple[list[Any], float]:
        rows, nll = await super().evaluate(client, label)
        spec, teacher = await self.teacher()
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
        dataset, sizes, extra = super().describe()
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
