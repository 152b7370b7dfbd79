"""The teachers: who they are (a served model, or a tinker:// checkpoint found on the service), the check that they
render and tokenize like the student, and what they are asked (their answers; the student's reverse KL to them)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import tinker
from tinker_cookbook import renderers
from tinker_cookbook.tokenizer_utils import get_tokenizer

from posttrain.config.renderers import resolve_renderer
from posttrain.errors import ConfigError, DataError
from posttrain.pipeline.evaluation.common import SamplingSettings, bounded_gather
from posttrain.pipeline.methods.base import RunContext
from posttrain.pipeline.methods.distillation.prompts import Messages, Share
from posttrain.pipeline.setup import backend, preflight
from posttrain.util import short_error, write_jsonl

# Strings whose encodings must agree between teacher and student tokenizers (words, digits, code, unicode).
TOKENIZER_PROBES = (
    "Hello, world!",
    "What is 12 + 30? #### 42",
    "def f(x):\n\treturn x**2",
    "naïve café 東京 🙂",
)


def check_teacher_found(teacher: str) -> None:
    """A teacher that exists nowhere is 'not found', said before its chat format (only guessed from its name
    then) is compared with the student's."""
    if backend.has_local_copy(teacher) or teacher in preflight.cookbook_models():
        return
    if os.environ.get("HF_HUB_OFFLINE", "").lower() not in ("1", "true", "yes"):
        from huggingface_hub import repo_exists

        try:
            if repo_exists(teacher):
                return
        except Exception:  # noqa: BLE001 - the Hub did not answer: the engine or the service judges later
            return
        raise ConfigError(
            f"teacher_model={teacher}: not found: not a local directory, not a Tinker model, "
            "not on the Hugging Face Hub"
        )
    raise ConfigError(
        f"teacher_model={teacher}: not found: not a local directory, not a Tinker model, and not in the Hugging Face "
        "cache (the Hub is offline)"
    )


def check_same_tokenizer(
    student: str, teacher: str, student_renderer: str, teacher_renderer: str, setting: str | None = None
) -> None:
    """One-line ConfigError unless the teacher renders and tokenizes like the student (tinker-cookbook #796).
    `setting`: what the user wrote, when `teacher` is not it (the base model of a tinker:// checkpoint)."""
    named = setting or f"teacher_model={teacher}"
    if student_renderer != teacher_renderer:
        raise ConfigError(
            f"{named} uses the {teacher_renderer} chat format but the student {student} uses "
            f"{student_renderer}; distillation needs the same renderer and tokenizer (tinker-cookbook #796)"
        )
    s_tok, t_tok = get_tokenizer(student), get_tokenizer(teacher)
    same = len(s_tok) == len(t_tok) and all(s_tok.encode(p) == t_tok.encode(p) for p in TOKENIZER_PROBES)
    if not same:
        raise ConfigError(
            f"{named} has a different tokenizer from the student {student} (vocabulary "
            f"{len(t_tok)} vs {len(s_tok)} tokens, or other token ids); distillation needs the same renderer "
            "and tokenizer (tinker-cookbook #796)"
        )


@dataclass(frozen=True)
class Teacher:
    base_model: str
    checkpoint: str | None  # a tinker:// sampler path, or None for the base model itself
    system_prompt: str | None = None  # prompt distillation: the teacher sees it, the student does not

    def messages(self, prompt: Messages) -> Messages:
        if self.system_prompt is None:
            return prompt
        return [
            {"role": "system", "content": self.system_prompt},
            *(m for m in prompt if m["role"] != "system"),
        ]


async def resolve_teacher(ctx: RunContext, teacher_model: str) -> Teacher:
    """The teacher's base model and checkpoint; a tinker:// path is looked up on the service, and its
    renderer (from the run's metadata) and tokenizer checked against the student's."""
    if not teacher_model.startswith("tinker://"):
        return Teacher(teacher_model, None)
    rest = ctx.service.create_rest_client()
    try:
        run = await rest.get_training_run_by_tinker_path(teacher_model)
    except Exception as exc:  # noqa: BLE001 - unknown path, malformed path, service error: one line
        raise ConfigError(
            f"teacher_model={teacher_model}: cannot find this checkpoint ({short_error(exc)})"
        ) from None
    renderer = (run.user_metadata or {}).get("renderer_name") or resolve_renderer(run.base_model, None)[0]
    check_same_tokenizer(
        ctx.cfg.model_name,
        run.base_model,
        ctx.renderer_name,
        renderer,
        f"teacher_model={teacher_model} (a checkpoint of {run.base_model})",
    )
    return Teacher(run.base_model, teacher_model)


async def teacher_client(ctx: RunContext, teacher: Teacher, setting: str) -> tinker.SamplingClient:
    """The teacher's sampling client; `setting` is how the user named the teacher, for a one-line refusal."""
    try:
        return await ctx.service.create_sampling_client(
            base_model=teacher.base_model, model_path=teacher.checkpoint
        )
    except Exception as exc:  # noqa: BLE001 - e.g. a checkpoint of a model this engine does not serve
        raise ConfigError(f"{setting}: {short_error(exc)}") from None


async def sample_completions(
    client: tinker.SamplingClient,
    renderer: renderers.Renderer,
    prompts: Sequence[Messages],
    settings: SamplingSettings,
    desc: str,
) -> list[str]:
    """One completion per prompt (concurrent, progress bar; prompt i with seed settings.seed + i); "" where
    sampling failed."""
    stop = renderer.get_stop_sequences()

    async def one(i: int, prompt: Messages) -> str:
        params = tinker.SamplingParams(
            max_tokens=settings.max_tokens,
            temperature=settings.temperature,
            stop=stop,
            seed=settings.seed + i,
        )
        try:
            out = await client.sample(renderer.build_generation_prompt(prompt), 1, params)
        except Exception:  # noqa: BLE001 - a failed prompt is dropped from the traces, not the run
            return ""
        return renderers.get_text_content(renderer.parse_response(out.sequences[0].tokens)[0]).strip()

    return await bounded_gather(list(prompts), one, settings.concurrency, desc)


def traces(prompts: Sequence[Messages], completions: Sequence[str]) -> list[dict]:
    """Conversations {"messages": prompt + teacher answer}, leaving out prompts the teacher left unanswered."""
    return [
        {"messages": [*p, {"role": "assistant", "content": c}]}
        for p, c in zip(prompts, completions, strict=True)
        if c
    ]


async def reverse_kl(
    models: tuple[tinker.SamplingClient, tinker.SamplingClient],
    renderer: renderers.Renderer,
    prompts: Sequence[Messages],
    settings: SamplingSettings,
    desc: str,
) -> tuple[float, int]:
    """KL(student || teacher) on held-out prompts, estimated on the student's own samples (log p_student -
    log p_teacher at each sampled token): (the sum over all sampled tokens, their number), so that per-token
    means can be pooled over teachers. `models` is (student, teacher); prompt i samples with seed
    settings.seed + i, at temperature 1."""
    student, teacher = models

    async def one(i: int, prompt: Messages) -> tuple[float, int]:
        model_input = renderer.build_generation_prompt(prompt)
        params = tinker.SamplingParams(
            max_tokens=settings.max_tokens,
            temperature=1.0,
            stop=renderer.get_stop_sequences(),
            seed=settings.seed + i,
        )
        try:
            seq = (await student.sample(model_input, 1, params)).sequences[0]
            if not seq.tokens or seq.logprobs is None:
                return 0.0, 0
            full = model_input
            for token in seq.tokens:
                full = full.append_int(token)
            teacher_lp = (await teacher.compute_logprobs(full))[-len(seq.tokens) :]
            diff = np.array(seq.logprobs, dtype=np.float64) - np.array(teacher_lp, dtype=np.float64)
            return float(diff.sum()), len(seq.tokens)
        except Exception:  # noqa: BLE001 - a failed prompt is left out of the estimate
            return 0.0, 0

    parts = await bounded_gather(list(prompts), one, settings.concurrency, f"{desc}: reverse KL")
    return sum(s for s, _ in parts), sum(n for _, n in parts)


def per_token(total: float, tokens: int | float) -> float:
    return total / tokens if tokens else float("nan")


@dataclass(frozen=True)
class Traces:
    """A split's teacher answers: the conversations, the teacher of each (its index), the count per teacher."""

    rows: list[dict]
    owners: list[int]
    counts: list[int]


class TeacherPool:
    """The run's teachers, one per share of the prompts, resolved on first use (a checkpoint found on the service,
    its renderer and tokenizer checked against the student's); their answers to a split's prompts.

    `fixed`: one teacher given outright (prompt distillation: the base model with the system prompt)."""

    def __init__(self, ctx: RunContext, shares: Sequence[Share], fixed: Teacher | None = None):
        self.ctx, self.shares, self.fixed = ctx, list(shares), fixed
        self._resolved: dict[int, tuple[Teacher, tinker.SamplingClient]] = {}

    @property
    def several(self) -> bool:
        return len(self.shares) > 1

    async def get(self, k: int) -> tuple[Teacher, tinker.SamplingClient]:
        if k not in self._resolved:
            spec = self.fixed or await resolve_teacher(self.ctx, self.shares[k].teacher_model)
            # The fixed teacher is the student's own base model, named by model_name=, not teacher_model=.
            setting = (
                f"model_name={spec.base_model} (the teacher, with system_prompt=)"
                if self.fixed
                else f"teacher_model={self.shares[k].teacher_model}"
            )
            self._resolved[k] = spec, await teacher_client(self.ctx, spec, setting)
        return self._resolved[k]

    async def check_all(self) -> None:
        """Every teacher found and checked before any is sampled."""
        for k in range(len(self.shares)):
            await self.get(k)

    async def answers(self, split: str, seed: int, desc: str) -> Traces:
        """Each teacher answers its own `split` ("train" or "eval") prompts; all traces go to
        data/teacher_{split}.jsonl (with several teachers each row names its `teacher`)."""
        cfg = self.ctx.cfg
        rows: list[dict] = []
        owners: list[int] = []
        counts: list[int] = []
        offset = 0
        for k, share in enumerate(self.shares):
            prompts = share.prompts.train if split == "train" else share.prompts.eval
            spec, client = await self.get(k)
            # Prompt i of teacher k: other seeds than any other teacher's prompts.
            settings = SamplingSettings(cfg.max_tokens, cfg.temperature, seed + offset, cfg.eval_concurrency)
            label = f"{desc} (teacher {k})" if self.several else desc
            completions = await sample_completions(
                client, self.ctx.renderer, [spec.messages(p) for p in prompts], settings, label
            )
            offset += len(prompts)
            answered = traces(prompts, completions)
            if not answered:
                raise DataError(
                    f"the teacher {share.teacher_model} answered none of the {len(prompts)} prompts ({desc})"
                )
            rows += [{**r, "teacher": share.teacher_model} for r in answered] if self.several else answered
            owners += [k] * len(answered)
            counts.append(len(answered))
        write_jsonl(self.ctx.data_dir / f"teacher_{split}.jsonl", rows)
        return Traces(rows, owners, counts)
