"""Model plumbing: the forward pass the sampler runs, and a prompt's chunked prefill."""

from __future__ import annotations

import contextlib
import inspect
import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from posttrain.engine.vision import VisionInputs

# Prompts are prefilled in chunks of this many tokens (bounds the [chunk, vocab] logits of prompt logprobs).
PREFILL_CHUNK_TOKENS = 512


def vocab_size_of(model: torch.nn.Module) -> int:
    get = getattr(model, "get_input_embeddings", None)
    embeddings = get() if callable(get) else None
    if isinstance(embeddings, torch.nn.Embedding):
        return int(embeddings.num_embeddings)
    return int(model_config(model).get_text_config().vocab_size)


def model_config(model: torch.nn.Module) -> object:
    config = getattr(model, "config", None)
    if config is None:
        raise TypeError("the model has no `config`; expected a transformers (or peft-wrapped) causal LM")
    return config


def model_device(model: torch.nn.Module) -> torch.device:
    for parameter in model.parameters():
        return parameter.device
    return torch.device("cpu")


@contextlib.contextmanager
def eval_mode(model: torch.nn.Module) -> Iterator[None]:
    """Disable dropout (e.g. LoRA dropout) while sampling, and restore every module's own mode afterwards."""
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training


class ModelRunner:
    def __init__(self, model: torch.nn.Module, device: torch.device, compute_dtype: torch.dtype) -> None:
        self.model = model
        self.device = device
        self.compute_dtype = compute_dtype
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        self.has_logits_to_keep = "logits_to_keep" in inspect.signature(base.forward).parameters
        text_config = model_config(model).get_text_config()
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
        images: dict[str, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Run the model on `input_ids` [B, T]; return float32 logits [B, T or 1, V].

        `position_ids` is [B, T], or [4, B, T] for a multimodal-RoPE model (text positions, then its 3 axes);
        `images` the pixel_values and image_grid_thw of a vision-language model's prompt."""
        kwargs: dict[str, object] = dict(images or {})
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
class Prefill:
    keys: list[torch.Tensor]  # per layer [1, kv_heads, L, head_dim]
    values: list[torch.Tensor]
    next_logits: torch.Tensor  # [V] float32: the distribution of the first generated token
    prompt_logprobs: list[float] | None
    rope_delta: int = 0  # with images (M-RoPE): decoding continues at position length + rope_delta


def prefill(
    runner: ModelRunner, prompt: list[int], want_prompt_logprobs: bool, vision: VisionInputs | None = None
) -> Prefill:
    """Run one prompt through the model in chunks; return its cache and the next-token logits.

    A prompt with images runs in one chunk: the model scatters each image's embeddings into its image-token
    positions, which must all be in the same forward pass as its pixel_values."""
    ids = torch.tensor([prompt], dtype=torch.long, device=runner.device)
    cache = DynamicCache()
    prompt_lps: list[float] = [math.nan]
    logits = torch.empty(0)
    chunk = PREFILL_CHUNK_TOKENS if vision is None else len(prompt)
    for start in range(0, len(prompt), chunk):
        stop = min(start + chunk, len(prompt))
        if vision is None:
            positions = torch.arange(start, stop, device=runner.device).unsqueeze(0)
            images = None
        else:
            positions = vision.position_ids.to(runner.device)
            images = vision.model_kwargs(runner.device, runner.compute_dtype)
        logits = runner.forward(
            ids[:, start:stop],
            position_ids=positions,
            cache=cache,
            all_logits=want_prompt_logprobs,
            images=images,
        )[0]
        if want_prompt_logprobs:
            # logits[t] predicts prompt[start + t + 1]
            targets = ids[0, start + 1 : stop + 1]
            lps = torch.log_softmax(logits[: len(targets)], dim=-1)
            prompt_lps.extend(lps.gather(1, targets.unsqueeze(1)).squeeze(1).tolist())
    layers = cache.layers
    if not layers or not all(type(layer) is DynamicLayer for layer in layers):
        raise NotImplementedError("the batched sampler supports models with a plain DynamicCache only")
    return Prefill(
        keys=[layer.keys for layer in layers],
        values=[layer.values for layer in layers],
        next_logits=logits[-1],
        prompt_logprobs=prompt_lps if want_prompt_logprobs else None,
        rope_delta=vision.rope_delta if vision is not None else 0,
    )
