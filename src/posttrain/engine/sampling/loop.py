"""Continuous batching: requests join the decoding batch at the next step, each leaves when it is done."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import torch

from posttrain.engine.sampling.batch import Batch, in_vocabulary
from posttrain.engine.sampling.model import ModelRunner, eval_mode, model_device, prefill, vocab_size_of
from posttrain.engine.sampling.plan import Plan, Unit, plan_request, split_units
from posttrain.engine.sampling.requests import (
    Decoding,
    GeneratedSequence,
    GenerationRequest,
    GenerationResult,
)
from posttrain.engine.sampling.tokens import Row, choose_tokens


def generate(
    model: torch.nn.Module, requests: list[GenerationRequest], decoding: Decoding
) -> list[GenerationResult]:
    """Generate `num_samples` completions for every request, decoding all of them together.

    What does not fit the batch budget waits and joins as rows finish, and a single request that is too large
    alone has its samples split (results do not change: seeds are per sample). Raises `ValueError` for an
    invalid request (empty or too long prompt, token id out of range, bad sampling parameters).
    """
    loop = DecodeLoop(model, decoding)
    for i, request in enumerate(requests):
        loop.check(request, f"request {i}")
    for i, request in enumerate(requests):
        loop.add(i, request, f"request {i}")
    results: dict[object, GenerationResult] = {}
    while not loop.idle:
        results.update(loop.step())
    return [results[i] for i in range(len(requests))]


class DecodeLoop:
    """Continuous batching: requests join the decoding batch at the next step, each leaves when it is done.

    `add` queues a request (validated at once); each `step` first admits queued requests that fit the token
    budget (prefilling their prompts and merging their rows into the running cache), then picks one token for
    every running row and runs one batched forward pass. It returns the requests whose samples are all done,
    so a caller can answer them at once while the others keep decoding. Rows never move in the cache and each
    draws from its own seeded generator, so a seeded request gives the same samples whenever it joins.
    """

    def __init__(self, model: torch.nn.Module, decoding: Decoding) -> None:
        if decoding.max_context < 1:
            raise ValueError(f"max_context must be positive, got {decoding.max_context}")
        self.model = model
        self.tokenizer = decoding.tokenizer
        self.eos_ids = frozenset(decoding.eos_token_ids)
        self.max_context = decoding.max_context
        self.max_batch_tokens = decoding.max_batch_tokens
        self.vocab_size = vocab_size_of(model)
        self.runner = ModelRunner(model, model_device(model), decoding.compute_dtype)
        self._queue: deque[tuple[object, Unit]] = deque()
        self._pending: dict[object, _Pending] = {}
        self._batch = Batch(self.runner, self.vocab_size)
        self._done: list[object] = []

    @property
    def idle(self) -> bool:
        return not self._queue and not self._batch.active and not self._done

    @property
    def running_rows(self) -> int:
        return len(self._batch.active)

    def check(self, request: GenerationRequest, where: str) -> Plan:
        return plan_request(where, request, self.vocab_size, self.max_context, self.tokenizer)

    def add(self, key: object, request: GenerationRequest, where: str = "request") -> None:
        """Queue a request under `key` (unique among the queued and running ones); ValueError if invalid."""
        plan = self.check(request, where)
        if key in self._pending:
            raise ValueError(f"{where}: key {key!r} is already queued")
        pending = _Pending(
            result=GenerationResult(sequences=[], prompt_logprobs=[] if request.prompt_logprobs else None),
            slots=[None] * request.num_samples,
        )
        self._pending[key] = pending
        units = split_units(plan, self.max_batch_tokens)
        pending.units_left = len(units)
        if not units:  # nothing to compute at all (no samples, no prompt logprobs)
            self._done.append(key)
        self._queue.extend((key, unit) for unit in units)

    def step(self) -> dict[object, GenerationResult]:
        """Admit what fits, decode one token for every running row; return the requests now complete."""
        with eval_mode(self.model), torch.inference_mode(), self.runner.autocast():
            self._admit()
            finished = self._batch.step() if self._batch.active else []
        for row in finished:
            self._finish_row(row)
        out: dict[object, GenerationResult] = {}
        for key in self._done:
            pending = self._pending.pop(key)
            assert all(s is not None for s in pending.slots)
            pending.result.sequences = [s for s in pending.slots if s is not None]
            out[key] = pending.result
        self._done = []
        return out

    def _finish_row(self, row: Row) -> None:
        pending = self._pending[row.key]
        pending.slots[row.sample_index] = row.result()
        pending.rows_left -= 1
        if pending.rows_left == 0 and pending.units_left == 0:
            self._done.append(row.key)

    def _admit(self) -> None:
        rows = len(self._batch.active)
        longest = self._batch.longest_row
        admitted: list[tuple[object, Unit]] = []
        while self._queue:
            key, unit = self._queue[0]
            row_len = unit.prompt_len + unit.plan.max_new
            new_rows, new_longest = rows + unit.rows, max(longest, row_len)
            if unit.rows and rows and new_rows * new_longest > self.max_batch_tokens:
                break
            self._queue.popleft()
            admitted.append((key, unit))
            if unit.rows:
                rows, longest = new_rows, new_longest
        if not admitted:
            return
        # Prefill each unique prompt once (full logits only where prompt logprobs were asked for).
        prompt_slot: dict[tuple, int] = {}
        prompts: list[GenerationRequest] = []
        want_logprobs: list[bool] = []
        for _, unit in admitted:
            prompt = unit.plan.request.prompt_key
            if prompt not in prompt_slot:
                prompt_slot[prompt] = len(want_logprobs)
                prompts.append(unit.plan.request)
                want_logprobs.append(False)
            if unit.want_prompt_logprobs:
                want_logprobs[prompt_slot[prompt]] = True
        prefills = [
            prefill(self.runner, r.prompt_tokens, want, r.vision)
            for r, want in zip(prompts, want_logprobs, strict=True)
        ]
        new_rows: list[Row] = []
        for key, unit in admitted:
            pending = self._pending[key]
            slot = prompt_slot[unit.plan.request.prompt_key]
            if unit.want_prompt_logprobs:
                pending.result.prompt_logprobs = list(prefills[slot].prompt_logprobs or [])
            pending.units_left -= 1
            for s in range(unit.start, unit.stop):
                row = Row(unit, s, slot, self.eos_ids, self.tokenizer)
                row.key = key
                pending.rows_left += 1
                new_rows.append(row)
            if pending.rows_left == 0 and pending.units_left == 0:
                self._done.append(key)
        # A row that takes one token (compute_logprobs asks for exactly one) takes it from its prompt's prefill
        # and never joins the batch, whose cache is only for decoding: when scoring requests arrived one by
        # one, each joined (copying the batch's cache) and left at the next step (copying it again).
        single = [row for row in new_rows if row.stop_reason is None and row.max_new == 1]
        if single:
            logits = torch.stack([prefills[row.prompt_slot].next_logits for row in single])
            tokens, logprobs = choose_tokens(in_vocabulary(logits, self.vocab_size), single)
            for row, token, logprob in zip(single, tokens, logprobs, strict=True):
                row.push(token, logprob)
        # Those, and rows with no budget (max_tokens=0, full context), are done already.
        for row in new_rows:
            if row.stop_reason is not None:
                self._finish_row(row)
        self._batch.add(prefills, [row for row in new_rows if row.stop_reason is None])


@dataclass
class _Pending:
    result: GenerationResult
    slots: list[GeneratedSequence | None]
    units_left: int = 0
    rows_left: int = 0
