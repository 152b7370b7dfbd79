"""Batched generation core of the local engine (the `asample` endpoint).

The server feeds sampling requests to a `DecodeLoop` (continuous batching); `generate` runs a fixed list of
requests through one. Semantics follow the Tinker SDK (`SamplingParams`, `SampleResponse`, `SampledSequence`):

- every sample of every request decodes together: one forward pass per decode step over all unfinished rows,
  on a KV cache; requests that arrive while a batch decodes join it at the next step (prefilled, their rows
  appended to the cache), and each request is complete as soon as its own rows are;
- each unique prompt is prefilled once (in chunks, so long prompts and prompt logprobs stay bounded in
  memory) and its cache is replicated for every row that continues it;
- the per-prompt caches are merged into one right-padded cache: each row keeps its keys at positions
  [0, length) and writes its next key at its own length, the attention mask hides the unused slots, and
  `position_ids` are per row. The cache lives in preallocated buffers that grow in blocks, so a decode step
  writes one slot instead of re-concatenating the whole cache;
- rows that finish leave the batch at once (the cache and the lengths are index-selected), and the key width
  shrinks to what the remaining rows need;
- returned logprobs are `log_softmax` of the raw (untempered, unfiltered) float32 logits, so they agree with a
  separate forward pass over prompt + completion;
- temperature, top-k and top-p apply per row, and each row draws from its own `torch.Generator` seeded from
  (seed, sample index). The numerics are batch-independent too where the kernels allow it: keys never move
  when other rows come or go, the key width is a multiple of 64, and a forward pass always has >= 2 rows
  (oneDNN's bf16 matmuls give a row the same bits in any batch of >= 2 rows). So in bf16 a seeded request
  gives bit-identical samples whatever shares its batch; in fp32, MKL's matmuls differ in the last bits
  with the batch size, which in practice never changes a sampled token.
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import math
import secrets
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Literal, TypeVar

import torch
from transformers import DynamicCache, PreTrainedTokenizerBase
from transformers.cache_utils import DynamicLayer

from posttrain.util import round_up

__all__ = [
    "DEFAULT_MAX_BATCH_TOKENS",
    "DecodeLoop",
    "GeneratedSequence",
    "GenerationRequest",
    "GenerationResult",
    "SamplingSpec",
    "generate",
]

StopReason = Literal["stop", "length"]
_T = TypeVar("_T")

# Budget of one sub-batch: rows * (longest prompt + longest allowed completion), i.e. the worst-case number
# of KV-cache slots. For SmolLM2-135M in bf16 a slot costs ~23 KB, so the default bounds the cache at ~750 MB.
DEFAULT_MAX_BATCH_TOKENS = 32768
# Prompts are prefilled in chunks of this many tokens (bounds the [chunk, vocab] logits of prompt logprobs).
PREFILL_CHUNK_TOKENS = 512
# The decode cache grows by at least this many slots at a time.
_CACHE_GROWTH_TOKENS = 128
# The key width of a decode step is a multiple of this: how a row's keys split into vector lanes and blocks
# inside the attention kernel then never depends on the other rows (masked slots add exact zeros).
_KEY_ALIGN = 64
# Top-k / top-p rows are first sampled among this many best tokens (see `_sample_filtered`).
_FILTER_CANDIDATES = 256
# Incremental detokenization re-decodes this many tokens before the new ones (context for leading spaces).
_DETOKENIZE_CONTEXT_TOKENS = 5


@dataclass
class SamplingSpec:
    max_tokens: int | None  # None -> until a stop or the context limit
    temperature: float = 1.0  # 0 -> greedy
    top_p: float = 1.0
    top_k: int = -1  # -1 (or 0) = no limit
    seed: int | None = None  # same seed + same request -> identical samples, whatever else is in the batch
    stop_strings: list[str] = field(default_factory=list)
    # None -> the model's EOS token ids; [] (with no stop strings) -> no stop at all, not even EOS.
    stop_token_ids: list[int] | None = None


@dataclass
class GenerationRequest:
    prompt_tokens: list[int]
    num_samples: int
    spec: SamplingSpec
    prompt_logprobs: bool = False  # logprob of each prompt token given its prefix; index 0 is NaN
    record_stability: bool = False  # keep the samples for stable_reinforce (engine/stability.py)


@dataclass
class GeneratedSequence:
    tokens: list[int]  # includes the stop token / the tokens of the stop string that ended the sequence
    logprobs: list[float]  # one per token: log_softmax of the raw logits, float32
    stop_reason: StopReason


@dataclass
class GenerationResult:
    sequences: list[GeneratedSequence]  # num_samples of them, in sample order
    prompt_logprobs: list[float] | None  # len(prompt_tokens), [0] = nan, when requested


def generate(
    model: torch.nn.Module,
    requests: list[GenerationRequest],
    *,
    tokenizer: PreTrainedTokenizerBase | None,
    eos_token_ids: list[int],
    compute_dtype: torch.dtype,
    max_batch_tokens: int = DEFAULT_MAX_BATCH_TOKENS,
    max_context: int,
) -> list[GenerationResult]:
    """Generate `num_samples` completions for every request, decoding all of them together.

    `max_context` caps prompt + completion (a request with `max_tokens=None` generates until a stop or this
    limit). `max_batch_tokens` caps rows * (longest prompt + longest completion) of the decoding batch; what
    does not fit waits and joins as rows finish, and a single request that is too large alone has its samples
    split (results do not change: seeds are per sample). `tokenizer` is only needed for stop strings. Raises
    `ValueError` for an invalid request (empty or too long prompt, token id out of range, bad sampling
    parameters).
    """
    loop = DecodeLoop(
        model,
        tokenizer=tokenizer,
        eos_token_ids=eos_token_ids,
        compute_dtype=compute_dtype,
        max_batch_tokens=max_batch_tokens,
        max_context=max_context,
    )
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

    def __init__(
        self,
        model: torch.nn.Module,
        *,
        tokenizer: PreTrainedTokenizerBase | None,
        eos_token_ids: list[int],
        compute_dtype: torch.dtype,
        max_context: int,
        max_batch_tokens: int = DEFAULT_MAX_BATCH_TOKENS,
    ) -> None:
        if max_context < 1:
            raise ValueError(f"max_context must be positive, got {max_context}")
        self.model = model
        self.tokenizer = tokenizer
        self.eos_ids = frozenset(eos_token_ids)
        self.max_context = max_context
        self.max_batch_tokens = max_batch_tokens
        self.vocab_size = _vocab_size(model)
        self.runner = _ModelRunner(model, _model_device(model), compute_dtype)
        self._queue: deque[tuple[object, _Unit]] = deque()
        self._pending: dict[object, _Pending] = {}
        self._batch = _Batch(self.runner, self.vocab_size)
        self._done: list[object] = []

    @property
    def idle(self) -> bool:
        return not self._queue and not self._batch.active and not self._done

    @property
    def running_rows(self) -> int:
        return len(self._batch.active)

    def check(self, request: GenerationRequest, where: str) -> _Plan:
        return _plan_request(where, request, self.vocab_size, self.max_context, self.tokenizer)

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
        units = _units(plan, self.max_batch_tokens)
        pending.units_left = len(units)
        if not units:  # nothing to compute at all (no samples, no prompt logprobs)
            self._done.append(key)
        self._queue.extend((key, unit) for unit in units)

    def step(self) -> dict[object, GenerationResult]:
        """Admit what fits, decode one token for every running row; return the requests now complete."""
        with _eval_mode(self.model), torch.inference_mode(), self.runner.autocast():
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

    def _finish_row(self, row: _Row) -> None:
        pending = self._pending[row.key]
        pending.slots[row.sample_index] = row.result()
        pending.rows_left -= 1
        if pending.rows_left == 0 and pending.units_left == 0:
            self._done.append(row.key)

    def _admit(self) -> None:
        rows = len(self._batch.active)
        longest = self._batch.longest_row
        admitted: list[tuple[object, _Unit]] = []
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
        prompt_slot: dict[tuple[int, ...], int] = {}
        want_logprobs: list[bool] = []
        for _, unit in admitted:
            prompt = tuple(unit.plan.request.prompt_tokens)
            if prompt not in prompt_slot:
                prompt_slot[prompt] = len(want_logprobs)
                want_logprobs.append(False)
            if unit.want_prompt_logprobs:
                want_logprobs[prompt_slot[prompt]] = True
        prefills = [
            _prefill(self.runner, list(p), want) for p, want in zip(prompt_slot, want_logprobs, strict=True)
        ]
        new_rows: list[_Row] = []
        for key, unit in admitted:
            pending = self._pending[key]
            slot = prompt_slot[tuple(unit.plan.request.prompt_tokens)]
            if unit.want_prompt_logprobs:
                pending.result.prompt_logprobs = list(prefills[slot].prompt_logprobs or [])
            pending.units_left -= 1
            for s in range(unit.start, unit.stop):
                row = _Row(unit, s, slot, self.eos_ids, self.tokenizer)
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
            tokens, logprobs = _choose_tokens(_in_vocabulary(logits, self.vocab_size), single)
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


# ----------------------------------------------------------------------------------------------------------
# Planning: validation, per-request limits, splitting into sub-batches


@dataclass
class _Plan:
    request: GenerationRequest
    max_new: int  # completion budget of each sample: min(max_tokens, max_context - prompt length)
    stop_ids: frozenset[int] | None  # None -> EOS (resolved per batch)
    stop_strings: list[str]


@dataclass
class _Unit:
    """A contiguous range of one request's samples that runs inside one sub-batch."""

    plan: _Plan
    start: int
    stop: int
    want_prompt_logprobs: bool

    @property
    def rows(self) -> int:
        return self.stop - self.start

    @property
    def prompt_len(self) -> int:
        return len(self.plan.request.prompt_tokens)


def _plan_request(
    where: str, request: GenerationRequest, vocab_size: int, max_context: int, tokenizer: object
) -> _Plan:
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
    return _Plan(request=request, max_new=max_new, stop_ids=stop_ids, stop_strings=stop_strings)


def _units(plan: _Plan, max_batch_tokens: int) -> list[_Unit]:
    """A request's samples in ranges whose worst-case cache (rows * max length) fits the budget."""
    request = plan.request
    if request.num_samples == 0:
        return [_Unit(plan, 0, 0, want_prompt_logprobs=True)] if request.prompt_logprobs else []
    row_len = len(request.prompt_tokens) + plan.max_new
    per_unit = max(1, max_batch_tokens // max(row_len, 1))
    return [
        _Unit(plan, start, min(start + per_unit, request.num_samples), request.prompt_logprobs and start == 0)
        for start in range(0, request.num_samples, per_unit)
    ]


# ----------------------------------------------------------------------------------------------------------
# Model plumbing


def _vocab_size(model: torch.nn.Module) -> int:
    get = getattr(model, "get_input_embeddings", None)
    embeddings = get() if callable(get) else None
    if isinstance(embeddings, torch.nn.Embedding):
        return int(embeddings.num_embeddings)
    return int(_config(model).get_text_config().vocab_size)


def _config(model: torch.nn.Module) -> object:
    config = getattr(model, "config", None)
    if config is None:
        raise TypeError("the model has no `config`; expected a transformers (or peft-wrapped) causal LM")
    return config


def _model_device(model: torch.nn.Module) -> torch.device:
    for parameter in model.parameters():
        return parameter.device
    return torch.device("cpu")


@contextlib.contextmanager
def _eval_mode(model: torch.nn.Module) -> Iterator[None]:
    """Disable dropout (e.g. LoRA dropout) while sampling, and restore every module's own mode afterwards."""
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training


class _ModelRunner:
    def __init__(self, model: torch.nn.Module, device: torch.device, compute_dtype: torch.dtype) -> None:
        self.model = model
        self.device = device
        self.compute_dtype = compute_dtype
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        self.has_logits_to_keep = "logits_to_keep" in inspect.signature(base.forward).parameters
        text_config = _config(model).get_text_config()
        layer_types = getattr(text_config, "layer_types", None)
        if getattr(text_config, "sliding_window", None) and (
            not layer_types or any(t != "full_attention" for t in layer_types)
        ):
            # Rows share one key width, so a sliding-window mask (which measures distance from the widest
            # row) would be wrong for the shorter ones.
            raise NotImplementedError("the batched sampler supports full-attention models only")

    def autocast(self) -> contextlib.AbstractContextManager[object]:
        if self.compute_dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.compute_dtype)

    def forward(
        self,
        input_ids: torch.Tensor,
        *,
        position_ids: torch.Tensor,
        cache: DynamicCache,
        attention_mask: torch.Tensor | None = None,
        all_logits: bool = False,
    ) -> torch.Tensor:
        """Run the model on `input_ids` [B, T]; return float32 logits [B, T or 1, V]."""
        kwargs: dict[str, object] = {}
        if self.has_logits_to_keep:
            # Two rows rather than one: the lm_head matmul then rounds the last row exactly as it does
            # within the full logits (a one-row matmul takes another kernel path).
            kwargs["logits_to_keep"] = 0 if all_logits else 2
        out = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=cache,
            use_cache=True,
            **kwargs,
        )
        logits = out.logits
        if not all_logits:
            logits = logits[:, -1:]
        return logits.float()


@dataclass
class _Prefill:
    keys: list[torch.Tensor]  # per layer [1, kv_heads, L, head_dim]
    values: list[torch.Tensor]
    next_logits: torch.Tensor  # [V] float32: the distribution of the first generated token
    prompt_logprobs: list[float] | None


def _prefill(runner: _ModelRunner, prompt: list[int], want_prompt_logprobs: bool) -> _Prefill:
    """Run one prompt through the model in chunks; return its cache and the next-token logits."""
    ids = torch.tensor([prompt], dtype=torch.long, device=runner.device)
    cache = DynamicCache()
    prompt_lps: list[float] = [math.nan]
    logits = torch.empty(0)
    for start in range(0, len(prompt), PREFILL_CHUNK_TOKENS):
        stop = min(start + PREFILL_CHUNK_TOKENS, len(prompt))
        positions = torch.arange(start, stop, device=runner.device).unsqueeze(0)
        logits = runner.forward(
            ids[:, start:stop], position_ids=positions, cache=cache, all_logits=want_prompt_logprobs
        )[0]
        if want_prompt_logprobs:
            # logits[t] predicts prompt[start + t + 1]
            targets = ids[0, start + 1 : stop + 1]
            lps = torch.log_softmax(logits[: len(targets)], dim=-1)
            prompt_lps.extend(lps.gather(1, targets.unsqueeze(1)).squeeze(1).tolist())
    layers = cache.layers
    if not layers or not all(type(layer) is DynamicLayer for layer in layers):
        raise NotImplementedError("the batched sampler supports models with a plain DynamicCache only")
    return _Prefill(
        keys=[layer.keys for layer in layers],
        values=[layer.values for layer in layers],
        next_logits=logits[-1],
        prompt_logprobs=prompt_lps if want_prompt_logprobs else None,
    )


@dataclass
class _RaggedState:
    """What the layers of one decode cache share: each row's length and the width of the next step."""

    lengths: torch.Tensor  # [B] tokens cached per row; row b holds them at key positions [0, lengths[b])
    rows: torch.Tensor  # [B] arange, for the per-row scatter of new keys
    width: int  # key width of the next forward: max(lengths) + 1, rounded up to _KEY_ALIGN
    max_width: int  # no row ever needs more slots than this (longest prompt + completion, aligned)


class _RaggedLayer(DynamicLayer):
    """A cache layer with per-row lengths over preallocated [B, H, capacity, D] buffers.

    Rows are right-padded: a row's keys sit at positions [0, length) and a decode step writes each row's new
    key at its own length. This keeps a sequence's keys at the same positions whatever else is in the batch
    (with left padding they would shift with the longest prompt, and attention kernels sum differently), and
    appending writes one slot instead of re-concatenating the whole cache. The model sees a key width of
    `state.width`; the attention mask hides each row's unused slots.
    """

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, state: _RaggedState) -> None:
        super().__init__()
        self.dtype, self.device = keys.dtype, keys.device
        self.is_initialized = True
        self._key_buffer = keys
        self._value_buffer = values
        self.state = state
        self._refresh_views()

    def _refresh_views(self) -> None:
        self.keys = self._key_buffer[:, :, : self.state.width]
        self.values = self._value_buffer[:, :, : self.state.width]

    def _reserve(self, needed: int) -> None:
        capacity = self._key_buffer.shape[2]
        if needed <= capacity:
            return
        grown = capacity + round_up(max(needed - capacity, _CACHE_GROWTH_TOKENS, capacity // 2), _KEY_ALIGN)
        extra = max(min(grown, self.state.max_width), needed) - capacity
        shape = (*self._key_buffer.shape[:2], extra, self._key_buffer.shape[3])
        self._key_buffer = torch.cat([self._key_buffer, self._key_buffer.new_zeros(shape)], dim=2)
        shape = (*self._value_buffer.shape[:2], extra, self._value_buffer.shape[3])
        self._value_buffer = torch.cat([self._value_buffer, self._value_buffer.new_zeros(shape)], dim=2)

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: object, **kwargs: object
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if key_states.shape[-2] != 1:
            raise RuntimeError("the ragged decode cache takes one token per row and step")
        self._reserve(self.state.width)
        index = (self.state.rows, slice(None), self.state.lengths)
        self._key_buffer[index] = key_states[:, :, 0].to(self.dtype)
        self._value_buffer[index] = value_states[:, :, 0].to(self.dtype)
        self._refresh_views()
        return self.keys, self.values

    def get_seq_length(self) -> int:
        # The model derives the key width of the mask from this: width - 1 cached + 1 new token.
        return self.state.width - 1

    def keep_rows(self, rows: torch.Tensor) -> None:
        self._key_buffer = self._key_buffer.index_select(0, rows)
        self._value_buffer = self._value_buffer.index_select(0, rows)
        self._refresh_views()

    def append_rows(self, other: _RaggedLayer) -> None:
        """Add `other`'s rows after these (both buffers padded to the larger capacity)."""
        capacity = max(self._key_buffer.shape[2], other._key_buffer.shape[2])

        def padded(buffer: torch.Tensor) -> torch.Tensor:
            missing = capacity - buffer.shape[2]
            if missing == 0:
                return buffer
            shape = (*buffer.shape[:2], missing, buffer.shape[3])
            return torch.cat([buffer, buffer.new_zeros(shape)], dim=2)

        self._key_buffer = torch.cat([padded(self._key_buffer), padded(other._key_buffer).to(self.dtype)])
        self._value_buffer = torch.cat(
            [padded(self._value_buffer), padded(other._value_buffer).to(self.dtype)]
        )
        self._refresh_views()

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self.keep_rows(indices)


def _ragged_cache(
    prefills: Sequence[_Prefill],
    row_prompt: torch.Tensor,
    lengths: torch.Tensor,
    reserve: int,
    max_width: int,
) -> tuple[DynamicCache, _RaggedState]:
    """One right-padded cache for all rows: row i continues prompt `row_prompt[i]`."""
    device = lengths.device
    rows = torch.arange(len(lengths), device=device)
    state = _RaggedState(lengths=lengths, rows=rows, width=0, max_width=max_width)
    capacity = min(round_up(max(p.keys[0].shape[2] for p in prefills) + reserve, _KEY_ALIGN), max_width)
    layers: list[DynamicLayer] = []
    for layer in range(len(prefills[0].keys)):
        merged: list[torch.Tensor] = []
        for tensors in ([p.keys[layer] for p in prefills], [p.values[layer] for p in prefills]):
            first = tensors[0]
            stacked = first.new_zeros((len(tensors), first.shape[1], capacity, first.shape[3]))
            for i, t in enumerate(tensors):
                stacked[i, :, : t.shape[2]] = t[0].to(first.dtype)
            merged.append(stacked.index_select(0, row_prompt))
        layers.append(_RaggedLayer(merged[0], merged[1], state))
    cache = DynamicCache()
    cache.layers = layers
    cache.layer_class_to_replicate = None
    return cache, state


# ----------------------------------------------------------------------------------------------------------
# Rows: per-sample state, stop detection and token choice


class _StopStringMatcher:
    """Incremental detokenization of the generated suffix; reports when a stop string appears in it."""

    def __init__(
        self, tokenizer: PreTrainedTokenizerBase, prompt: list[int], stop_strings: list[str]
    ) -> None:
        self.tokenizer = tokenizer
        self.stop_strings = stop_strings
        self.longest = max(len(s) for s in stop_strings)
        # A few prompt tokens give the first generated token its context (e.g. SentencePiece leading spaces).
        self.ids = list(prompt[-_DETOKENIZE_CONTEXT_TOKENS:])
        self.prefix_offset = 0
        self.read_offset = len(self.ids)
        self.text = ""

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)

    def push(self, token: int) -> bool:
        self.ids.append(token)
        prefix = self._decode(self.ids[self.prefix_offset : self.read_offset])
        full = self._decode(self.ids[self.prefix_offset :])
        if len(full) <= len(prefix):
            return False
        new_text = full[len(prefix) :]
        # A trailing U+FFFD is an incomplete UTF-8 sequence: the characters before it are final and are
        # searched now, but the text is committed (and the offsets move) only once the character completes.
        complete = new_text.rstrip("\ufffd")
        tail = self.text[max(0, len(self.text) - self.longest + 1) :] + complete
        if len(complete) == len(new_text):
            self.text += new_text
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        return any(s in tail for s in self.stop_strings)


def _row_seed(seed: int | None, sample_index: int) -> int:
    if seed is None:
        return secrets.randbits(63)
    digest = hashlib.blake2b(f"{seed}:{sample_index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


class _Row:
    def __init__(
        self,
        unit: _Unit,
        sample_index: int,
        prompt_slot: int,
        eos_ids: frozenset[int],
        tokenizer: PreTrainedTokenizerBase | None,
    ) -> None:
        plan = unit.plan
        spec = plan.request.spec
        self.plan = plan
        self.key: object = None  # the DecodeLoop key of the request
        self.sample_index = sample_index
        self.prompt_slot = prompt_slot
        self.prompt_len = len(plan.request.prompt_tokens)
        self.max_new = plan.max_new
        self.temperature = float(spec.temperature)
        self.top_k = int(spec.top_k)
        self.top_p = float(spec.top_p)
        self.stop_ids = eos_ids if plan.stop_ids is None else plan.stop_ids
        self.matcher: _StopStringMatcher | None = None
        if plan.stop_strings:
            assert tokenizer is not None
            self.matcher = _StopStringMatcher(tokenizer, plan.request.prompt_tokens, plan.stop_strings)
        self.generator: torch.Generator | None = None
        if self.temperature > 0:
            self.generator = torch.Generator(device="cpu")
            self.generator.manual_seed(_row_seed(spec.seed, sample_index))
        self.tokens: list[int] = []
        self.logprobs: list[float] = []
        self.stop_reason: StopReason | None = None if self.max_new > 0 else "length"

    def uniform(self) -> float:
        assert self.generator is not None
        return float(torch.rand((), generator=self.generator, dtype=torch.float64))

    def push(self, token: int, logprob: float) -> bool:
        """Record a sampled token; return True when the row is finished."""
        self.tokens.append(token)
        self.logprobs.append(logprob)
        if token in self.stop_ids or (self.matcher is not None and self.matcher.push(token)):
            self.stop_reason = "stop"
        elif len(self.tokens) >= self.max_new:
            self.stop_reason = "length"
        return self.stop_reason is not None

    def result(self) -> GeneratedSequence:
        assert self.stop_reason is not None
        return GeneratedSequence(tokens=self.tokens, logprobs=self.logprobs, stop_reason=self.stop_reason)


def _choose_tokens(logits: torch.Tensor, rows: Sequence[_Row]) -> tuple[list[int], list[float]]:
    """Pick one token per row from float32 logits [B, V]; return the tokens and their raw logprobs.

    Each row's pick depends only on its own logits and its own generator: rows with top-k/top-p always take
    the sorted path and the others the unsorted one, whatever else is in the batch.
    """
    vocab = logits.shape[1]
    logprobs = torch.log_softmax(logits, dim=-1)
    tokens = logits.argmax(dim=-1)
    plain: list[int] = []
    filtered: list[int] = []
    for i, row in enumerate(rows):
        if row.temperature > 0:
            (filtered if 0 < row.top_k < vocab or row.top_p < 1 else plain).append(i)
    for group in (plain, filtered):
        if not group:
            continue
        index = torch.tensor(group, dtype=torch.long, device=logits.device)
        group_rows = [rows[i] for i in group]
        temperature = logits.new_tensor([r.temperature for r in group_rows]).unsqueeze(1)
        scaled = logits.index_select(0, index) / temperature
        uniforms = torch.tensor([r.uniform() for r in group_rows], dtype=torch.float64, device=logits.device)
        if group is plain:
            picks = _inverse_cdf(torch.softmax(scaled, dim=-1), uniforms)
        else:
            top_k = [r.top_k if 0 < r.top_k < vocab else vocab for r in group_rows]
            top_p = [r.top_p for r in group_rows]
            picks = _sample_filtered(scaled, top_k, top_p, uniforms)
        tokens = tokens.index_copy(0, index, picks)
    chosen_logprobs = logprobs.gather(1, tokens.unsqueeze(1)).squeeze(1)
    return tokens.tolist(), chosen_logprobs.tolist()


def _sample_filtered(
    scaled: torch.Tensor, top_k: list[int], top_p: list[float], uniforms: torch.Tensor
) -> torch.Tensor:
    """Sample from tempered logits [B, V] restricted by top-k (k = V: none), then top-p (1: none).

    Top-k keeps the k most likely tokens and renormalizes; top-p then keeps each token whose preceding mass
    (in decreasing order) is below p, so the first always stays. Sorting a 50k vocabulary costs more than a
    small model's decode step, so rows are first tried on their `_FILTER_CANDIDATES` best tokens (exact when
    the top-k or the nucleus ends inside them), and only the others sort everything. Candidates are ordered by
    (logit desc, token id asc), as the full sort orders them.
    """
    batch, vocab = scaled.shape
    device = scaled.device
    picks = torch.empty(batch, dtype=torch.long, device=device)
    k_limit = torch.tensor(top_k, device=device)
    p_limit = torch.tensor(top_p, dtype=scaled.dtype, device=device)
    # The candidate count is the same for every row (it must not depend on the other rows in the batch).
    width = _FILTER_CANDIDATES
    candidate_rows = [i for i, k in enumerate(top_k) if width < vocab and (k <= width or k == vocab)]
    pending = sorted(set(range(batch)) - set(candidate_rows))
    if candidate_rows:
        index = torch.tensor(candidate_rows, dtype=torch.long, device=device)
        rows, k_rows, p_rows = scaled.index_select(0, index), k_limit[index], p_limit[index]
        values, ids = rows.topk(width, dim=-1)
        by_id = ids.argsort(dim=-1)
        ids, values = ids.gather(1, by_id), values.gather(1, by_id)
        values, order = values.sort(dim=-1, descending=True, stable=True)
        ids = ids.gather(1, order)
        has_k = k_rows < vocab
        kept = values.masked_fill(torch.arange(width, device=device) >= k_rows.unsqueeze(1), -math.inf)
        log_norm = torch.where(has_k, kept.logsumexp(dim=-1), rows.logsumexp(dim=-1))
        probs = torch.exp(kept - log_norm.unsqueeze(1))
        cumulative = probs.cumsum(dim=-1)
        exact = (has_k | (cumulative[:, -1] >= p_rows)).tolist()
        outside = (cumulative - probs >= p_rows.unsqueeze(1)) & (p_rows < 1).unsqueeze(1)
        probs = probs.masked_fill(outside, 0.0)
        chosen = ids.gather(1, _inverse_cdf(probs, uniforms[index]).unsqueeze(1)).squeeze(1)
        for j, row in enumerate(candidate_rows):
            if exact[j]:
                picks[row] = chosen[j]
            else:
                pending.append(row)
    if pending:
        pending_index = torch.tensor(pending, dtype=torch.long, device=device)
        rows = scaled.index_select(0, pending_index)
        values, ids = rows.sort(dim=-1, descending=True, stable=True)
        k_rows = k_limit.index_select(0, pending_index).unsqueeze(1)
        values = values.masked_fill(torch.arange(vocab, device=device) >= k_rows, -math.inf)
        probs = torch.softmax(values, dim=-1)
        p_rows = p_limit.index_select(0, pending_index).unsqueeze(1)
        probs = probs.masked_fill((probs.cumsum(dim=-1) - probs >= p_rows) & (p_rows < 1), 0.0)
        row_uniforms = uniforms.index_select(0, pending_index)
        picks[pending_index] = ids.gather(1, _inverse_cdf(probs, row_uniforms).unsqueeze(1)).squeeze(1)
    return picks


def _inverse_cdf(probs: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """Sample one index per row of (unnormalized) `probs` with one uniform draw per row."""
    cdf = probs.double().cumsum(dim=-1)
    targets = (uniforms * cdf[:, -1]).unsqueeze(1)
    picks = torch.searchsorted(cdf, targets, right=True).squeeze(1)
    return picks.clamp_(max=probs.shape[1] - 1)


# ----------------------------------------------------------------------------------------------------------
# The decoding batch


class _Batch:
    """The running rows, their right-padded cache and their next-token logits."""

    def __init__(self, runner: _ModelRunner, vocab_size: int) -> None:
        self.runner = runner
        self.vocab_size = vocab_size
        self.active: list[_Row] = []
        self.cache: DynamicCache | None = None
        self.state: _RaggedState | None = None
        self.layers: list[_RaggedLayer] = []
        self.logits: torch.Tensor | None = None  # [len(active), V] float32
        self.columns = torch.arange(0, device=runner.device)

    @property
    def longest_row(self) -> int:
        return max((row.prompt_len + row.max_new for row in self.active), default=0)

    def add(self, prefills: list[_Prefill], rows: list[_Row]) -> None:
        """Merge new rows (row.prompt_slot indexes `prefills`) into the batch, after the running ones."""
        if not rows:
            return
        device = self.runner.device
        logits = torch.stack([prefills[row.prompt_slot].next_logits for row in rows])
        # The physical batch is the active rows in order (active row i is physical row i), plus a copy of the
        # first one when only one is left: CPU matmul kernels take another path for a single row and round
        # differently, while with two or more rows each row's result does not depend on the others. Together
        # with the right-padded cache this keeps seeded samples independent of the batch's composition.
        physical = _with_companion(rows) if not self.active else rows
        used = sorted({row.prompt_slot for row in rows})
        local = {slot: i for i, slot in enumerate(used)}
        row_prompt = torch.tensor(
            [local[row.prompt_slot] for row in physical], dtype=torch.long, device=device
        )
        lengths = torch.tensor([row.prompt_len for row in physical], dtype=torch.long, device=device)
        reserve = min(max(row.max_new for row in rows), _CACHE_GROWTH_TOKENS)
        max_width = round_up(max(row.prompt_len + row.max_new for row in rows), _KEY_ALIGN)
        cache, state = _ragged_cache(
            [prefills[slot] for slot in used], row_prompt, lengths, reserve, max_width
        )
        layers = [layer for layer in cache.layers if isinstance(layer, _RaggedLayer)]
        if not self.active:
            self.cache, self.state, self.layers = cache, state, layers
            self.active, self.logits = list(rows), logits
            return
        assert self.state is not None and self.logits is not None
        if self.state.lengths.shape[0] > len(self.active):  # drop the companion row
            keep = torch.arange(len(self.active), device=device)
            self.state.lengths = self.state.lengths.index_select(0, keep)
            for layer in self.layers:
                layer.keep_rows(keep)
        for layer, extra in zip(self.layers, layers, strict=True):
            layer.append_rows(extra)
        self.state.lengths = torch.cat([self.state.lengths, state.lengths])
        self.state.rows = torch.arange(len(self.state.lengths), device=device)
        self.state.max_width = max(self.state.max_width, state.max_width)
        self.active = self.active + list(rows)
        self.logits = torch.cat([self.logits[: len(self.active) - len(rows)], logits])

    def step(self) -> list[_Row]:
        """Pick one token for every active row; run the next forward pass for those that go on.

        Returns the rows that finished."""
        assert self.logits is not None and self.state is not None and self.cache is not None
        device = self.runner.device
        state, active = self.state, self.active
        logits = _in_vocabulary(self.logits, self.vocab_size)
        tokens, logprobs = _choose_tokens(logits[: len(active)], active)
        keep = [i for i, row in enumerate(active) if not row.push(tokens[i], logprobs[i])]
        finished = [row for i, row in enumerate(active) if row.stop_reason is not None]
        if not keep:
            self.__init__(self.runner, self.vocab_size)  # type: ignore[misc]
            return finished
        if len(keep) < len(active) or state.lengths.shape[0] != len(_with_companion(active)):
            index = torch.tensor(_with_companion(keep), dtype=torch.long, device=device)
            state.lengths = state.lengths.index_select(0, index)
            state.rows = torch.arange(len(index), device=device)
            for layer in self.layers:
                layer.keep_rows(index)
            active = [active[i] for i in keep]
            tokens = [tokens[i] for i in keep]
        self.active = active
        next_ids = torch.tensor(_with_companion(tokens), dtype=torch.long, device=device)
        state.width = round_up(int(state.lengths.max()) + 1, _KEY_ALIGN)
        if self.columns.shape[0] != state.width:
            self.columns = torch.arange(state.width, device=device)
        mask = (self.columns.unsqueeze(0) <= state.lengths.unsqueeze(1)).long()
        out = self.runner.forward(
            next_ids.unsqueeze(1),
            position_ids=state.lengths.unsqueeze(1),
            cache=self.cache,
            attention_mask=mask,
        )[:, -1]
        state.lengths = state.lengths + 1
        self.logits = out[: len(active)]
        return finished


def _in_vocabulary(logits: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """`logits` [B, V'] with a padded lm_head's extra ids (V' > vocab_size) set to -inf: never sampled."""
    if logits.shape[1] > vocab_size:
        logits[:, vocab_size:] = -math.inf
    return logits


def _with_companion(items: list[_T]) -> list[_T]:
    return items if len(items) >= 2 else items + items[:1]
