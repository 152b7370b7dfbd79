"""Planning a request: validation, its per-sample limits, its samples split into sub-batches."""

from __future__ import annotations

import math
from dataclasses import dataclass

from posttrain.engine.sampling.requests import GenerationRequest


@dataclass
class Plan:
    request: GenerationRequest
    max_new: int  # completion budget of each sample: min(max_tokens, max_context - prompt length)
    stop_ids: frozenset[int] | None  # None -> EOS (resolved per batch)
    stop_strings: list[str]


@dataclass
class Unit:
    """A contiguous range of one request's samples that runs inside one sub-batch."""

    plan: Plan
    start: int
    stop: int
    want_prompt_logprobs: bool

    @property
    def rows(self) -> int:
        return self.stop - self.start

    @property
    def prompt_len(self) -> int:
        return len(self.plan.request.prompt_tokens)


def plan_request(
    where: str, request: GenerationRequest, vocab_size: int, max_context: int, tokenizer: object
) -> Plan:
    prompt = request.prompt_tokens
    spec = request.spec
    if not prompt:
        raise ValueError(f"{where}: the prompt is empty")
    if len(prompt) > max_context:
        raise ValueError(
            f"{where}: the prompt has {len(prompt)} tokens, more than the context ({max_context})"
        )
    bad = [t for t in prompt if not 0 <= t < vocab_size]
    if bad:
        raise ValueError(f"{where}: token id {bad[0]} is outside the vocabulary (size {vocab_size})")
    if request.num_samples < 0:
        raise ValueError(f"{where}: num_samples must be >= 0, got {request.num_samples}")
    if spec.max_tokens is not None and spec.max_tokens < 0:
        raise ValueError(f"{where}: max_tokens must be >= 0, got {spec.max_tokens}")
    if not (spec.temperature >= 0 and math.isfinite(spec.temperature)):
        raise ValueError(f"{where}: temperature must be a finite number >= 0, got {spec.temperature}")
    if not 0 < spec.top_p <= 1:
        raise ValueError(f"{where}: top_p must be in (0, 1], got {spec.top_p}")
    stop_strings = [s for s in spec.stop_strings if s]
    if stop_strings and tokenizer is None:
        raise ValueError(f"{where}: stop strings need a tokenizer")
    max_new = max_context - len(prompt)
    if spec.max_tokens is not None:
        max_new = min(max_new, spec.max_tokens)
    stop_ids = None if spec.stop_token_ids is None else frozenset(spec.stop_token_ids)
    return Plan(request=request, max_new=max_new, stop_ids=stop_ids, stop_strings=stop_strings)


def split_units(plan: Plan, max_batch_tokens: int) -> list[Unit]:
    """A request's samples in ranges whose worst-case cache (rows * max length) fits the budget."""
    request = plan.request
    if request.num_samples == 0:
        return [Unit(plan, 0, 0, want_prompt_logprobs=True)] if request.prompt_logprobs else []
    row_len = len(request.prompt_tokens) + plan.max_new
    per_unit = max(1, max_batch_tokens // max(row_len, 1))
    return [
        Unit(plan, start, min(start + per_unit, request.num_samples), request.prompt_logprobs and start == 0)
        for start in range(0, request.num_samples, per_unit)
    ]
