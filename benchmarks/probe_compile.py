"""How far `torch.compile` takes bench_sft's plain PyTorch + PEFT loop: eager vs compiled steps, in one process.

A probe, not a side-by-side benchmark of the engine: it asks whether fusing the elementwise work would bring the
default model's training near the machine's matmul rate, and what the compiling costs.

    uv run python benchmarks/probe_compile.py                       # 32 x 48 tokens, 4 steps each way
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
import posttrain.engine.serve  # noqa: E402, F401  (the engine's OpenMP settings, before torch loads)

# isort: split

import torch
from _common import default_threads, machine_info, matmul_gflops, median
from bench_sft import PlainLoop, real_text_batches


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=48)
    parser.add_argument("--steps", type=int, default=4, help="timed steps each way")
    args = parser.parse_args()

    from transformers import AutoTokenizer

    from posttrain.engine.models import choose_dtype, resolve_model

    torch.set_num_threads(default_threads())
    dtype = choose_dtype("auto", torch.device("cpu"))
    source = resolve_model(None)
    batches = real_text_batches(
        AutoTokenizer.from_pretrained(source.path), 2 * args.steps + 2, args.batch, args.seq_len
    )
    loop = PlainLoop(str(source.path), 16, 1e-4, dtype)
    flops_per_token = 4 * loop.n_matmul + 6 * loop.n_lora  # as bench_sft, less attention's small share
    tokens = args.batch * args.seq_len

    def timed(chunk: list[list[list[int]]]) -> float:
        times = []
        for batch in chunk:
            t0 = time.perf_counter()
            loop.step(batch)
            times.append(time.perf_counter() - t0)
        return median(times)

    loop.step(batches[0])
    eager = timed(batches[1 : 1 + args.steps])
    loop.model = torch.compile(loop.model)
    t0 = time.perf_counter()
    loop.step(batches[1 + args.steps])
    first = time.perf_counter() - t0
    compiled = timed(batches[2 + args.steps :])
    peak = matmul_gflops(dtype)
    print(
        f"{machine_info()['cpu']}, {torch.get_num_threads()} threads, {dtype}, {args.batch} x {args.seq_len}"
    )
    for name, s in (("eager", eager), ("compiled", compiled)):
        rate = tokens / s * flops_per_token / 1e9
        print(
            f"{name}: {s:.2f} s/step, {tokens / s:.0f} tok/s, {rate:.0f} GFLOP/s = {100 * rate / peak:.0f}% "
            f"of the matmul rate ({peak:.0f} GFLOP/s)"
        )
    print(f"compiling + first compiled step: {first:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
