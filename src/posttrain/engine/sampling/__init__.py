"""Batched generation core of the local engine (the `asample` endpoint).

The server feeds sampling requests to a `DecodeLoop` (`loop`: continuous batching); `generate` runs a fixed list
of requests through one. The parts: `requests` (what is asked), `plan` (checks and sub-batches), `model` (forward
passes and prefill), `cache` (the right-padded decode cache), `tokens` (per-row stop detection and token choice),
`batch` (the running rows). Semantics follow the Tinker SDK (`SamplingParams`, `SampleResponse`, `SampledSequence`):

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

from posttrain.engine.sampling.loop import DecodeLoop, generate
from posttrain.engine.sampling.requests import (
    DEFAULT_MAX_BATCH_TOKENS,
    Decoding,
    GeneratedSequence,
    GenerationRequest,
    GenerationResult,
    SamplingSpec,
)

__all__ = [
    "DEFAULT_MAX_BATCH_TOKENS",
    "DecodeLoop",
    "Decoding",
    "GeneratedSequence",
    "GenerationRequest",
    "GenerationResult",
    "SamplingSpec",
    "generate",
]
