"""A training step's throughput by the shape of its datums: the local engine from this tree vs from another
(`--engine-src`, e.g. the commit before a change), through the unmodified tinker SDK, on the same datums.

Shapes: RL rollouts (16 rollouts of 150-350 tokens, the importance-sampling loss), seven
284-token rollouts (the RL plan's probe shape), and the default SFT run's 32 x 48 (cross-entropy). Each side runs
in its own engine, one after the other, in interleaved blocks (A, B, B, A, ...), never at once; each block times
every shape `--reps` times after a warm-up step and keeps the best. Token ids are random (the speed does not depend
on them); the same seeded datums go to both sides.

    uv run python benchmarks/bench_train_shapes.py --engine-src /path/to/old/src --name train_shapes_NAME
"""

from __future__ import annotations

import argparse
import os
import random
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
import posttrain.engine.serve  # noqa: E402, F401 - the engine's OpenMP setting, before torch loads

# isort: split

from _common import default_threads, load_average, machine_info, markdown_table, median, write_results

API_KEY = "tml-benchmark"
# (name, loss, datums, tokens per datum: a fixed length or a (low, high) range)
SHAPES = [
    ("rl_16x150-350", "importance_sampling", 16, (150, 350)),
    ("rl_7x284", "importance_sampling", 7, 284),
    ("sft_32x48", "cross_entropy", 32, 48),
]


def datums(loss: str, count: int, length: int | tuple[int, int], seed: int) -> list:
    from tinker import types

    rng = random.Random(seed)
    out = []
    for _ in range(count):
        n = length if isinstance(length, int) else rng.randint(*length)
        tokens = [rng.randrange(100, 40000) for _ in range(n + 1)]
        inputs: dict = {"target_tokens": tokens[1:]}
        if loss == "cross_entropy":
            inputs["weights"] = [1.0] * n
        else:
            inputs |= {"logprobs": [-2.0] * n, "advantages": [0.5] * n}
        out.append(types.Datum(model_input=types.ModelInput.from_ints(tokens[:-1]), loss_fn_inputs=inputs))
    return out


def one_block(src: str | None, threads: int, reps: int) -> dict[str, float]:
    """Start an engine (from `src`, or this tree), time every shape, stop it: {shape: best tokens/s}."""
    import tinker

    from posttrain.engine.launcher import EngineProcess, ServeOptions
    from posttrain.engine.models import resolve_model

    log_dir = tempfile.mkdtemp(prefix="bench-shapes-")
    options = ServeOptions(
        models=None, checkpoint_dir=os.path.join(log_dir, "checkpoints"), api_key=API_KEY, threads=threads
    )
    env = {"PYTHONPATH": os.path.abspath(src)} if src else None
    engine = EngineProcess(options, log_file=os.path.join(log_dir, "engine.log"), env=env)
    url = engine.start()
    try:
        service = tinker.ServiceClient(base_url=url, api_key=API_KEY)
        client = service.create_lora_training_client(base_model=resolve_model(None).name, rank=32, seed=0)
        rates = {}
        for i, (name, loss, count, length) in enumerate(SHAPES):
            data = datums(loss, count, length, seed=i)
            tokens = sum(d.model_input.length for d in data)
            client.forward_backward(data, loss).result()  # warm-up
            best = float("inf")
            for _ in range(reps):
                start = time.perf_counter()
                client.forward_backward(data, loss).result()
                best = min(best, time.perf_counter() - start)
            rates[name] = tokens / best
        return rates
    finally:
        engine.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--engine-src", required=True, help="the other tree's `src` directory (side B)")
    parser.add_argument("--blocks", type=int, default=1, help="blocks per side, interleaved")
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--name", default="train_shapes")
    args = parser.parse_args()
    threads = args.threads or default_threads()
    sides = {"this tree": None, "engine-src": args.engine_src}
    rates: dict[str, list[dict[str, float]]] = {side: [] for side in sides}
    loads = [load_average()]
    for block in range(args.blocks):
        order = list(sides) if block % 2 == 0 else list(reversed(sides))
        for side in order:
            rates[side].append(one_block(sides[side], threads, args.reps))
            loads.append(load_average())
            print(
                f"block {block} {side}: "
                + ", ".join(f"{k} {v:.0f} tok/s" for k, v in rates[side][-1].items())
            )
    medians = {
        side: {name: median([b[name] for b in blocks]) for name, *_ in SHAPES}
        for side, blocks in rates.items()
    }
    rows = [
        [
            name,
            f"{medians['this tree'][name]:.0f}",
            f"{medians['engine-src'][name]:.0f}",
            f"{medians['this tree'][name] / medians['engine-src'][name]:.2f}",
        ]
        for name, *_ in SHAPES
    ]
    table = markdown_table(["shape", "this tree tok/s", "engine-src tok/s", "ratio"], rows)
    print(table)
    results = {
        "machine": machine_info(),
        "threads": threads,
        "engine_src": args.engine_src,
        "loads": loads,
        "blocks": rates,
        "median_tok_s": medians,
        "table": table,
    }
    print(f"results: {write_results(args.name, results)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
