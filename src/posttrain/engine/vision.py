"""Images in model inputs: the wire's image chunks laid out as image-token positions for a vision-language model.

A `ModelInput` arrives as parts: runs of token ids and images. A vision-language model's own image processor
(its `preprocessor_config.json`) turns each image into `pixel_values` and a patch grid (`image_grid_thw`); the
image then takes grid/merge^2 `<|image_pad|>` positions, into which the model scatters its image embeddings.
The model's own `get_rope_index` gives the multimodal (M-RoPE) positions, so the training forward pass and the
sampler compute exactly what the model's `generate` would. Only Qwen-VL style models (image_token_id,
spatial_merge_size, get_rope_index) are supported.
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from posttrain.engine.errors import WireError
from posttrain.errors import UserError
from posttrain.util import short_error

IMAGE_FORMATS = ("png", "jpeg")


@dataclass(frozen=True)
class ImageInput:
    """One image chunk as sent: raw png/jpeg bytes and the token count the client expects (advisory)."""

    data: bytes
    format: str
    expected_tokens: int | None
    where: str  # names the chunk in errors, e.g. "datum 0 model_input chunk 1"


Part = list[int] | ImageInput


def image_input(data: bytes, fmt: str, expected_tokens: int | None, where: str) -> ImageInput:
    """An image chunk checked for what needs no model: its format and a sane expected_tokens."""
    if fmt not in IMAGE_FORMATS:
        raise WireError(f"{where}: image format {fmt!r} is not supported (png or jpeg)")
    if expected_tokens is not None and expected_tokens < 1:
        raise WireError(f"{where}: expected_tokens must be >= 1, got {expected_tokens}")
    return ImageInput(data, fmt, expected_tokens, where)


def has_images(parts: Sequence[Part]) -> bool:
    return any(isinstance(p, ImageInput) for p in parts)


def text_tokens(parts: Sequence[Part]) -> list[int]:
    """The tokens of parts that hold no image."""
    return [t for p in parts if not isinstance(p, ImageInput) for t in p]


def input_length(parts: Sequence[Part]) -> int | None:
    """The length the SDK gives this input (images count their expected_tokens); None if one has none."""
    total = 0
    for p in parts:
        if isinstance(p, ImageInput):
            if p.expected_tokens is None:
                return None
            total += p.expected_tokens
        else:
            total += len(p)
    return total


@dataclass
class VisionInputs:
    """What a vision-language model needs besides the token ids of one sequence holding images."""

    pixel_values: torch.Tensor  # [patches, C * temporal * patch^2], every image's patches one after the other
    image_grid_thw: torch.Tensor  # [images, 3]
    position_ids: torch.Tensor  # [4, 1, T]: text positions (for the attention mask), then the 3 M-RoPE axes
    rope_delta: int  # M-RoPE position of the next token minus the sequence length (decoding goes on there)
    key: str  # digest of the images: prompts with equal tokens but other images are other prompts

    def model_kwargs(self, device: torch.device, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        return {
            "pixel_values": self.pixel_values.to(device, dtype),
            "image_grid_thw": self.image_grid_thw.to(device),
        }


RopeIndex = Callable[..., tuple[torch.Tensor, torch.Tensor]]


class ImageLayout:
    """A served vision-language model's image processor, image token and M-RoPE index."""

    def __init__(self, path: Path, config: Any, model: torch.nn.Module) -> None:
        # Imported from the module: transformers' top-level AutoImageProcessor insists on torchvision, while the
        # module picks the PIL backend when torchvision is absent (as the cookbook's get_image_processor does).
        from transformers.models.auto.image_processing_auto import AutoImageProcessor

        try:
            self.processor = AutoImageProcessor.from_pretrained(path)
        except OSError as exc:
            raise UserError(
                f"{path}: a vision-language model needs its preprocessor_config.json ({short_error(exc, 200)})"
            ) from None
        rope_index: RopeIndex | None = getattr(getattr(model, "model", None), "get_rope_index", None)
        merge = getattr(config.vision_config, "spatial_merge_size", None)
        if rope_index is None or merge is None or getattr(config, "image_token_id", None) is None:
            raise UserError(
                f"{path}: a {config.model_type} vision-language model is not supported by the local engine "
                "(only Qwen-VL style models: image_token_id, spatial_merge_size and get_rope_index)"
            )
        self.image_token_id = int(config.image_token_id)
        self.merge = int(merge)
        self.rope_index = rope_index

    def lay_out(self, parts: Sequence[Part]) -> tuple[list[int], VisionInputs | None]:
        """Token ids with each image as its image-token positions, and what the model needs for the images."""
        if not has_images(parts):
            return text_tokens(parts), None
        tokens: list[int] = []
        pixels: list[torch.Tensor] = []
        grids: list[torch.Tensor] = []
        digest = hashlib.sha256()
        for part in parts:
            if not isinstance(part, ImageInput):
                tokens.extend(part)
                continue
            pixel_values, grid = self._process(part)
            count = int(grid.prod()) // self.merge**2
            if part.expected_tokens is not None and part.expected_tokens != count:
                raise WireError(
                    f"{part.where}: the image is {count} tokens for this model "
                    f"(grid {grid.tolist()}), but expected_tokens is {part.expected_tokens}"
                )
            tokens.extend([self.image_token_id] * count)
            pixels.append(pixel_values)
            grids.append(grid)
            digest.update(part.data)
        grid_thw = torch.stack(grids)
        ids = torch.tensor([tokens])
        mrope, delta = self.rope_index(ids, (ids == self.image_token_id).int(), image_grid_thw=grid_thw)
        text = torch.arange(len(tokens)).view(1, 1, -1)
        return tokens, VisionInputs(
            pixel_values=torch.cat(pixels),
            image_grid_thw=grid_thw,
            position_ids=torch.cat([text, mrope]),
            rope_delta=int(delta.reshape(-1)[0]),
            key=digest.hexdigest(),
        )

    def _process(self, image: ImageInput) -> tuple[torch.Tensor, torch.Tensor]:
        from PIL import Image

        try:
            with Image.open(io.BytesIO(image.data)) as opened:
                picture = opened.convert("RGB")
        except Exception as exc:  # noqa: BLE001 - PIL raises several kinds for bad bytes
            raise WireError(
                f"{image.where}: the image bytes could not be decoded as {image.format} ({type(exc).__name__})"
            ) from None
        out = self.processor(images=[picture], return_tensors="pt")
        return out["pixel_values"], out["image_grid_thw"][0]


def is_vision_config(config: Any) -> bool:
    """Whether a transformers config is a vision-language one (it has a vision tower)."""
    return getattr(config, "vision_config", None) is not None
