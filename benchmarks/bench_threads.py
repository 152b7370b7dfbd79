"""Thread policy: training steps with 1 vs all threads, OpenMP waiting policies, idle vs with a competing process.

Each configuration runs in a fresh subprocess (OpenMP reads its environment once, at load), doing LoRA SFT steps
(forward, backward, AdamW) of SmolLM2-135M-Instruct in the engine's auto dtype on `--batch` x `--seq-len`
tokens. Configurations alternate, and each runs once with the machine as it is ("idle") and once beside
`--hogs` busy-looping processes ("loaded"), so the comparison is side by side in one run.

    uv run python benchmarks/bench_threads.py
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

from _common import load_average, machine_info, markdown_table, median, write_results

WORKER = r"""
import json, os, sys, time, warnings
import torch
sys.path.insert(0, os.path.join(os.environ["REPO"], "benchmarks"))
from bench_sft import PlainLoop, real_text_batches
from posttrain.engine.models import choose_dtype, resolve_model
from transformers import AutoTokenizer
threads, batch, seq_len, steps = (int(x) for x in sys.argv[1:5])
torch.set_num_threads(threads)
source = resolve_model(None)
dtype = choose_dtype("auto")
tok = AutoTokenizer.from_pretrained(source.path)
batches = real_text_batches(tok, steps + 1, batch, seq_len)
loop = PlainLoop(str(source.path), 16, 1e-4, dtype)
from posttrain.engine.threads import ThreadPolicy
policy = ThreadPolicy(threads) if os.environ.get("ADAPTIVE") == "1" else None
used = []
def step(b):
    if policy is not None:  # the engine's default policy: measured demand of other processes
        torch.set_num_threads(policy.before_job())
    used.append(torch.get_num_threads())
    loop.step(b)
    if policy is not None:
        policy.after_job()
step(batches[0])
times = []
for b in batches[1:]:
    t0 = time.perf_counter(); step(b); times.append(time.perf_counter() - t0)
print("RESULT " + json.dumps({"times": times, "dtype": str(dtype), "threads_used": used[1:]}))
"""

POLICIES = {
    "default": {},  # libgomp spins a while before sleeping
    "passive": {"OMP_WAIT_POLICY": "PASSIVE"},
    # the engine's default: spin briefly, then sleep; threads follow the measured demand of other processes
    "adaptive": {"OMP_WAIT_POLICY": "PASSIVE", "GOMP_SPINCOUNT": "1000", "ADAPTIVE": "1"},
    # libgomp spins this many times at a barrier before it sleeps (its default: 300k, or 1k when oversubscribed)
    "spin1k": {"GOMP_SPINCOUNT": "1000"},
    "spin10k": {"GOMP_SPINCOUNT": "10000"},
    "spin100k": {"GOMP_SPINCOUNT": "100000"},
}


def run_worker(threads: int, policy: str, args) -> dict:
    env = {**os.environ, "REPO": os.path.dirname(os.path.dirname(os.path.abspath(__file__)))}
    env.pop("OMP_WAIT_POLICY", None)
    env.pop("ADAPTIVE", None)
    env.pop("GOMP_SPINCOUNT", None)
    env.update(POLICIES[policy])
    out = subprocess.run(
        [sys.executable, "-c", WORKER, str(threads), str(args.batch), str(args.seq_len), str(args.steps)],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    for line in out.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    raise SystemExit(f"worker failed: {out.stderr[-2000:]}")


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=48)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--hogs", type=int, default=1, help="busy-looping processes in the loaded phase")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--name", default="threads")
    parser.add_argument(
        "--with-spin",
        action="store_true",
        help="also all threads with libgomp's default spinning (slow when loaded)",
    )
    parser.add_argument(
        "--policies",
        default="passive,adaptive",
        help=f"all-thread policies to compare with 1 thread, from: {', '.join(POLICIES)}",
    )
    args = parser.parse_args()
    cpus = len(os.sched_getaffinity(0))
    configs = [(1, "default")] + [(cpus, p) for p in args.policies.split(",")]
    if args.with_spin:
        configs.insert(1, (cpus, "default"))
    results: dict[str, dict[str, list[float]]] = {}
    loads = []
    threads_used: dict[str, dict[str, list[int]]] = {}
    for rnd in range(args.rounds):
        for load in ("idle", "loaded"):
            hogs = []
            if load == "loaded":
                hogs = [
                    subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(args.hogs)
                ]
                time.sleep(1)
            try:
                order = configs if rnd % 2 == 0 else configs[::-1]
                for threads, policy in order:
                    r = run_worker(threads, policy, args)
                    key = f"{threads}t-{policy}"
                    results.setdefault(key, {}).setdefault(load, []).extend(r["times"])
                    threads_used.setdefault(key, {}).setdefault(load, []).extend(r["threads_used"])
                    print(
                        f"round {rnd} {load:6} {key:12} median {median(r['times']):.2f} s/step "
                        f"({r['dtype']}, threads used {r['threads_used']}) load {load_average()}",
                        flush=True,
                    )
            finally:
                for h in hogs:
                    h.kill()
                    h.wait()
            loads.append(load_average())
    tokens = args.batch * args.seq_len
    rows = []
    summary = {}
    for key, by_load in results.items():
        summary[key] = {load: round(tokens / median(ts), 1) for load, ts in by_load.items()}
        rows.append([key, summary[key]["idle"], summary[key]["loaded"]])
    table = markdown_table(
        ["threads-policy", "tokens/s idle", f"tokens/s beside {args.hogs} busy process(es)"], rows
    )
    print(table)
    write_results(
        args.name,
        {
            "benchmark": "threads",
            "machine": machine_info(),
            "command": " ".join(["uv run python", *sys.argv]),
            "config": vars(args),
            "tokens_per_s": summary,
            "step_times": results,
            "threads_used": threads_used,
            "load_average": loads,
            "table": table,
        },
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
