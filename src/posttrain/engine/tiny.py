"""A tiny randomly initialised Llama with the default model's tokenizer: loads in milliseconds.

For protocol tests, CI and debugging a recipe's plumbing; it learns, but it knows nothing.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from posttrain.engine.models import default_model_dir

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")


def make_tiny_model(directory: str | Path, hidden: int = 64, layers: int = 2, seed: int = 0) -> Path:
    directory = Path(directory)
    if (directory / "model.safetensors").exists():
        return directory
    source = default_model_dir()
    directory.mkdir(parents=True, exist_ok=True)
    for name in _TOKENIZER_FILES:
        if (source / name).exists():
            shutil.copy(source / name, directory / name)
    config = LlamaConfig(
        vocab_size=49152,
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
        tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    LlamaForCausalLM(config).save_pretrained(directory)
    return directory
