"""Benchmark 2: 64 prompts sampled through the SDK concurrently vs one at a time vs one batched `model.generate`,
and the same 64 requests arriving one by one (staggered) while earlier ones decode (continuous batching).

Every request generates exactly `--max-tokens` tokens (`stop=[]` disables every stop, EOS included; HF gets
`min_new_tokens`), so tokens/s compare like with like. Both sides use the dtype the engine chooses (auto) and
the same fixed thread count. The engine and the in-process HF model never compute at the same time: the engine
is idle once its requests are answered. `--engine-src` runs the engine from another source tree (before/after).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time

import posttrain.engine.serve  # noqa: F401 - the engine process's OpenMP setting, before torch loads

# isort: split

import torch
from _common import default_threads, load_average, machine_info, markdown_table, write_results

QUESTIONS = [
    "What is the capital of {}?",
    "Name one famous dish from {}.",
    "What language is spoken in {}?",
    "Describe the weather in {} in one sentence.",
]
PLACES = [
    "France",
    "Japan",
    "Peru",
    "Kenya",
    "Norway",
    "India",
    "Chile",
    "Egypt",
    "Canada",
    "Italy",
    "Vietnam",
    "Ghana",
    "Spain",
    "Mexico",
    "Greece",
    "Brazil",
]


def prompts(tokenizer, n: int) -> list[list[int]]:
    out = []
    for i in range(n):
        question = QUESTIONS[i % len(QUESTIONS)].format(PLACES[(i // len(QUESTIONS)) % len(PLACES)])
        text = f"<|im_start|>user\n{question} ({i})<|im_end|>\n<|im_start|>assistant\n"
        out.append(tokenizer.encode(text))
    return out


async def sdk_runs(
    url: str, model: str, token_prompts: list[list[int]], max_tokens: int, sequential_n: int, gap: float
) -> dict[str, float]:
    import tinker

    service = tinker.ServiceClient(base_url=url, api_key="tml-benchmark")
    client = await service.create_sampling_client(base_model=model)
    params = tinker.SamplingParams(max_tokens=max_tokens, temperature=1.0, stop=[], seed=1)

    async def one(tokens: list[int]) -> int:
        result = await client.sample(
            tinker.ModelInput.from_ints(tokens), num_samples=1, sampling_params=params
        )
        return len(result.sequences[0].tokens)

    await one(token_prompts[0])  # warm-up
    t0 = time.perf_counter()
    concurrent_tokens = sum(await asyncio.gather(*[one(p) for p in token_prompts]))
    concurrent = time.perf_counter() - t0

    # Staggered: request i is sent at i * gap seconds (turns arriving one by one, as in multi-turn RL).
    latencies: list[float] = []

    async def later(i: int, tokens: list[int]) -> int:
        await asyncio.sleep(i * gap)
        start = time.perf_counter()
        n = await one(tokens)
        latencies.append(time.perf_counter() - start)
        return n

    t0 = time.perf_counter()
    staggered_tokens = sum(await asyncio.gather(*[later(i, p) for i, p in enumerate(token_prompts)]))
    staggered = time.perf_counter() - t0

    t0 = time.perf_counter()
    sequential_tokens = 0
    for p in token_prompts[:sequential_n]:
        sequential_tokens += await one(p)
    sequential = time.perf_counter() - t0
    return {
        "concurrent_tok_s": concurrent_tokens / concurrent,
        "concurrent_s": concurrent,
        "staggered_gap_s": gap,
        "staggered_s": staggered,
        "staggered_tok_s": staggered_tokens / staggered,
        "staggered_mean_latency_s": sum(latencies) / len(latencies),
        "sequential_requests": sequential_n,
        "sequential_tok_s": sequential_tokens / sequential,
        "sequential_s": sequential,
        "tokens": concurrent_tokens,
    }


def hf_generate(
    path: str, token_prompts: list[list[int]], max_tokens: int, threads: int, dtype: torch.dtype
) -> dict[str, float]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(threads)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()
    width = max(len(p) for p in token_prompts)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in token_prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in token_prompts])
    kwargs = dict(
        max_new_tokens=max_tokens,
        min_new_tokens=max_tokens,
        do_sample=True,
        temperature=1.0,
        top_k=0,
        pad_token_id=pad,
    )
    with torch.inference_mode():
        model.generate(
            input_ids=ids[:2], attention_mask=mask[:2], **{**kwargs, "max_new_tokens": 4, "min_new_tokens": 4}
        )
        t0 = time.perf_counter()
        out = model.generate(input_ids=ids, attention_mask=mask, **kwargs)
        elapsed = time.perf_counter() - t0
    tokens = int((out.shape[1] - width) * out.shape[0])
    return {"hf_generate_tok_s": tokens / elapsed, "hf_generate_s": elapsed, "tokens": tokens}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--name", default="sampling")
    parser.add_argument("--threads", type=int, default=0, help="on both sides (0: every processor)")
    parser.add_argument("--sequential", type=int, default=8, help="requests in the one-at-a-time run")
    parser.add_argument("--gap", type=float, default=0.25, help="seconds between staggered arrivals")
    parser.add_argument("--engine-src", default=None, help="run the engine from this `src` tree")
    parser.add_argument("--skip-hf", action="store_true", help="engine runs only")
    args = parser.parse_args()
    sys.path.insert(0, "src")
    from posttrain.engine.launcher import EngineProcess, ServeOptions
    from posttrain.engine.models import DEFAULT_MODEL, choose_dtype, resolve_model

    dtype = choose_dtype("auto", torch.device("cpu"))
    dtype_name = {torch.bfloat16: "bf16", torch.float32: "fp32"}[dtype]

    source = resolve_model(None)
    from transformers import AutoTokenizer

    token_prompts = prompts(AutoTokenizer.from_pretrained(source.path), args.prompts)
    threads = args.threads or default_threads()
    load_before = load_average()
    env = {"PYTHONPATH": os.path.abspath(args.engine_src)} if args.engine_src else None
    with EngineProcess(ServeOptions(dtype=dtype_name, threads=threads), env=env) as engine:
        assert engine.url is not None
        sdk = asyncio.run(
            sdk_runs(engine.url, DEFAULT_MODEL, token_prompts, args.max_tokens, args.sequential, args.gap)
        )
    if args.skip_hf:
        hf = {"hf_generate_tok_s": float("nan"), "hf_generate_s": float("nan"), "tokens": 0}
    else:
        hf = hf_generate(str(source.path), token_prompts, args.max_tokens, threads, dtype)
    load_after = load_average()
    ratios = {
        "concurrent_vs_sequential": sdk["concurrent_tok_s"] / sdk["sequential_tok_s"],
        "concurrent_vs_hf_generate": sdk["concurrent_tok_s"] / hf["hf_generate_tok_s"],
    }
    table = markdown_table(
        ["mode", "tokens", "seconds", "tokens/s"],
        [
            [
                f"SDK, {args.prompts} concurrent requests",
                sdk["tokens"],
                f"{sdk['concurrent_s']:.1f}",
                f"{sdk['concurrent_tok_s']:.1f}",
            ],
            [
                f"SDK, {args.prompts} requests staggered by {args.gap} s",
                sdk["tokens"],
                f"{sdk['staggered_s']:.1f}",
                f"{sdk['staggered_tok_s']:.1f}",
            ],
            [
                f"SDK, one request at a time ({args.sequential} requests)",
                args.sequential * args.max_tokens,
                f"{sdk['sequential_s']:.1f}",
                f"{sdk['sequential_tok_s']:.1f}",
            ],
            [
                "HF `model.generate`, one batched call",
                hf["tokens"],
                f"{hf['hf_generate_s']:.1f}",
                f"{hf['hf_generate_tok_s']:.1f}",
            ],
        ],
    )
    print(table)
    print(
        f"\nconcurrent / sequential = {ratios['concurrent_vs_sequential']:.2f}x (target >= 5x); "
        f"concurrent / HF generate = {ratios['concurrent_vs_hf_generate']:.2f}x"
    )
    print(f"staggered: mean latency {sdk['staggered_mean_latency_s']:.1f} s per request")
    print(f"{dtype_name}, {threads} thread(s); load average before {load_before}, after {load_after}")
    command = "uv run python benchmarks/bench_sampling.py " + " ".join(sys.argv[1:])
    path = write_results(
        args.name,
        {
            "benchmark": "sampling",
            "machine": machine_info(),
            "command": command.strip(),
            "config": {
                "prompts": args.prompts,
                "max_tokens": args.max_tokens,
                "dtype": dtype_name,
                "threads": threads,
                "gap_s": args.gap,
                "engine_src": args.engine_src,
            },
            "sdk": sdk,
            "hf": hf,
            "ratios": ratios,
            "load_average": {"before": load_before, "after": load_after},
            "table": table,
        },
    )
    print(f"results: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
