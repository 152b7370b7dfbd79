"""A randomly initialised Llama-architecture model of a larger shape, for throughput benchmarks.

No larger model's weights can be downloaded here, and a step's speed depends on the shapes, not the values:
this writes a model directory with the default model's tokenizer and chat template and random weights.

    uv run python benchmarks/make_shape_model.py --shape 1b --out /tmp/llama-1b-shape
    uv run python benchmarks/bench_sft.py --model /tmp/llama-1b-shape --name sft_1b_shape
"""

from __future__ import annotations

import argparse

# Llama-3.2-1B's layer shapes (hidden 2048, MLP 8192, 32 query / 8 key-value heads, 16 layers) and
# SmolLM2-360M's (hidden 960, MLP 2560, 15 / 5 heads, 32 layers), with SmolLM2's 49k vocabulary.
SHAPES = {
    "360m": dict(
        hidden_size=960,
        intermediate_size=2560,
        num_attention_heads=15,
        num_key_value_heads=5,
        num_hidden_layers=32,
    ),
    "1b": dict(
        hidden_size=2048,
        intermediate_size=8192,
        num_attention_heads=32,
        num_key_value_heads=8,
        num_hidden_layers=16,
    ),
}


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--shape", choices=sorted(SHAPES), required=True)
    parser.add_argument("--out", required=True, help="the model directory to write")
    args = parser.parse_args()

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from posttrain.engine.models import resolve_model

    source = resolve_model(None)
    config = AutoConfig.from_pretrained(source.path)
    for key, value in SHAPES[args.shape].items():
        setattr(config, key, value)
    config.head_dim = config.hidden_size // config.num_attention_heads
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(args.out)
    AutoTokenizer.from_pretrained(source.path).save_pretrained(args.out)
    n = sum(p.numel() for p in model.parameters())
    print(f"{args.out}: {n / 1e6:.0f}M parameters, {args.shape} shape, random weights")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
