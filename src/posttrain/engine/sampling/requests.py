"""What a sampling request asks for and what it gets back; what decoding needs to know of the model."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
from transformers import PreTrainedTokenizerBase

from posttrain.engine.vision import VisionInputs

StopReason = Literal["stop", "length"]

# Budget of one sub-batch: rows * (longest prompt + longest allowed completion), i.e. the worst-case number
# of KV-cache slots. For SmolLM2-135M in bf16 a slot costs ~23 KB, so the default bounds the cache at ~750 MB.
DEFAULT_MAX_BATCH_TOKENS = 32768


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
    vision: VisionInputs | None = None  # the prompt's images (their positions are image tokens in the prompt)

    @property
    def prompt_key(self) -> tuple[tuple[int, ...], str | None]:
        """Equal for requests whose prompts prefill identically (same tokens, same images)."""
        return tuple(self.prompt_tokens), self.vision.key if self.vision is not None else None


@dataclass
class GeneratedSequence:
    tokens: list[int]  # includes the stop token / the tokens of the stop string that ended the sequence
    logprobs: list[float]  # one per token: log_softmax of the raw logits, float32
    stop_reason: StopReason


@dataclass
class GenerationResult:
    sequences: list[GeneratedSequence]  # num_samples of them, in sample order
    prompt_logprobs: list[float] | None  # len(prompt_tokens), [0] = nan, when requested


@dataclass(frozen=True)
class Decoding:
    """What decoding needs besides the weights. `max_context` caps prompt + completion (a request with
    `max_tokens=None` generates until a stop or this limit); `max_batch_tokens` caps rows * (longest prompt +
    longest completion) of the decoding batch; `tokenizer` is only needed for stop strings."""

    eos_token_ids: list[int]
    compute_dtype: torch.dtype
    max_context: int
    tokenizer: PreTrainedTokenizerBase | None = None
    max_batch_tokens: int = DEFAULT_MAX_BATCH_TOKENS
