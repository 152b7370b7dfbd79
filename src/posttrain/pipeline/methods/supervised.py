"""task=sft's two kinds of data: conversations train a chat model (`sft.SFT`); image classification rows
(`{"image", "label"}`) train a vision-language model as an image classifier (`image_sft.ImageSFT`, the cookbook's
vlm_classifier recipe)."""

from __future__ import annotations

from typing import Any

from posttrain.pipeline.data import LoadedData
from posttrain.pipeline.methods.image_sft import ImageSFT
from posttrain.pipeline.methods.sft import SFT, SFTConfig


def supervised(cfg: SFTConfig, data: LoadedData | None) -> Any:
    if data is not None and data.format == "image":
        return ImageSFT(cfg, data)
    return SFT(cfg, data)
