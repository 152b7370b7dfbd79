"""SFT step throughput: the local engine through the unmodified tinker SDK vs a plain PyTorch + PEFT loop.

Both sides do the same work on the same data: LoRA r=16, alpha=32 on the engine's target modules (attention,
MLP and lm_head), the dtype the engine chooses on this machine (bf16 autocast where the processor has native
bf16, else fp32) with fp32 LoRA weights, a summed cross-entropy over every target token, and an
AdamW step. The two run one after the other, never at once (the engine is idle between requests), in
interleaved blocks (engine, plain, plain, engine, ...), so a change of load on the shared machine hits both.
The matmul rate in that dtype is measured in the same run, before every block, with the same thread count,
and the engine's peak resident memory (VmHWM) at the end.

    uv run python benchmarks/bench_sft.py                                 # 4 x 256 tokens, 4 blocks of 3 steps
    uv run python benchmarks/bench_sft.py --batch 32 --seq-len 48 --name sft_default_batches   # train.py's
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
import time
import warnings

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# The engine's own OpenMP setting, for the plain loop too (same threads, same waiting): importing serve sets it,
# before torch loads.
import posttrain.engine.serve  # noqa: E402, F401

# isort: split

import torch
import torch.nn.functional as F
from _common import (
    default_threads,
    load_average,
    machine_info,
    markdown_table,
    matmul_gflops,
    median,
    write_results,
)

API_KEY = "tml-benchmark"


def real_text_batches(tokenizer, n_batches: int, batch: int, seq_len: int) -> list[list[list[int]]]:
    """Chunks of seq_len + 1 tokens of English prose (the Python reference manual shipped with CPython)."""
    from pydoc_data.topics import topics

    text = "\n\n".join(topics[k] for k in sorted(topics))
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    need = n_batches * batch * (seq_len + 1)
    if len(ids) < need:
        raise SystemExit(f"only {len(ids)} tokens of text, {need} needed")
    chunks = [ids[i * (seq_len + 1) : (i + 1) * (seq_len + 1)] for i in range(n_batches * batch)]
    return [chunks[b * batch : (b + 1) * batch] for b in range(n_batches)]


def engine_target_modules(model: torch.nn.Module) -> list[str]:
    """The engine's default selection (runtime.ServedModel.target_modules with attn, mlp and unembed on)."""
    from posttrain.engine.runtime import ATTN_NAMES, MLP_NAMES

    targets = []
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            leaf = name.rsplit(".", 1)[-1]
            if leaf in ATTN_NAMES or leaf in MLP_NAMES or leaf == "lm_head":
                targets.append(name)
    return targets


class PlainLoop:
    """The reference: HF model in bf16, PEFT LoRA with fp32 weights, autocast bf16, AdamW."""

    def __init__(self, path: str, rank: int, lr: float, dtype: torch.dtype = torch.bfloat16):
        from peft import LoraConfig, get_peft_model
        from transformers import AutoModelForCausalLM

        self.dtype = dtype
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
        model.eval()  # no dropout anywhere, as in the engine
        for p in model.parameters():
            p.requires_grad_(False)
        self.targets = engine_target_modules(model)
        # Counted before LoRA wraps the layers: every base weight that is multiplied (lm_head included).
        self.n_matmul = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
        self.config = model.config
        config = LoraConfig(r=rank, lora_alpha=32, lora_dropout=0.0, target_modules=self.targets, bias="none")
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r".*tie_word_embeddings.*")
            torch.manual_seed(0)
            self.model = get_peft_model(model, config)
        self.params = [p for n, p in self.model.named_parameters() if "lora_" in n]
        for p in self.params:
            p.data = p.data.float()
            p.requires_grad_(True)
        self.n_lora = sum(p.numel() for p in self.params)
        self.opt = torch.optim.AdamW(self.params, lr=lr, betas=(0.9, 0.95), eps=1e-12, weight_decay=0.0)

    def step(self, batch: list[list[int]]) -> float:
        seqs = torch.tensor(batch)  # equal lengths: no padding
        ids, targets = seqs[:, :-1], seqs[:, 1:]
        autocast = (
            torch.autocast("cpu", dtype=self.dtype)
            if self.dtype != torch.float32
            else contextlib.nullcontext()
        )
        with autocast:
            logits = self.model(input_ids=ids, use_cache=False).logits
        loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction="sum")
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return float(loss.detach())


class EngineLoop:
    """The same steps through the tinker SDK against a local engine."""

    def __init__(self, url: str, base_model: str, rank: int, lr: float):
        import tinker
        from tinker import types

        self.types = types
        self.service = tinker.ServiceClient(base_url=url, api_key=API_KEY)
        self.client = self.service.create_lora_training_client(base_model=base_model, rank=rank, seed=0)
        if hasattr(self.client, "result"):
            self.client = self.client.result()
        self.adam = types.AdamParams(learning_rate=lr, beta1=0.9, beta2=0.95, eps=1e-12)

    def datum(self, seq: list[int]):
        n = len(seq) - 1
        return self.types.Datum(
            model_input=self.types.ModelInput.from_ints(seq[:-1]),
            loss_fn_inputs={"target_tokens": seq[1:], "weights": [1.0] * n},
        )

    def step(self, batch: list[list[int]]) -> float:
        fb = self.client.forward_backward([self.datum(s) for s in batch], "cross_entropy")
        opt = self.client.optim_step(self.adam)
        out = fb.result()
        opt.result()
        return float(out.metrics["loss:sum"])


def peak_rss_mb(pid: int | None) -> float | None:
    """The peak resident memory of a process so far (VmHWM), in MB."""
    if pid is None:
        return None
    try:
        for line in open(f"/proc/{pid}/status"):
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        return None
    return None


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--batch", type=int, default=4, help="sequences per step")
    parser.add_argument("--seq-len", type=int, default=256, help="tokens per sequence (model input)")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps on each side first")
    parser.add_argument("--blocks", type=int, default=4, help="timed blocks per side, interleaved")
    parser.add_argument("--steps-per-block", type=int, default=3)
    parser.add_argument(
        "--threads", type=int, default=0, help="torch threads on both sides (0: every processor)"
    )
    parser.add_argument(
        "--dtype", default="auto", choices=["auto", "bf16", "fp32"], help="as the engine's --dtype"
    )
    parser.add_argument(
        "--engine-src",
        default=None,
        help="run the engine from this source tree (a `src` directory, e.g. an older commit's) for before/after",
    )
    parser.add_argument(
        "--model",
        default=None,
        help="a model directory (e.g. a randomly initialised larger shape) instead of the default model",
    )
    parser.add_argument("--name", default="sft", help="results go to benchmarks/results/NAME.json")
    args = parser.parse_args()

    from posttrain.engine.models import choose_dtype

    threads = args.threads or default_threads()
    torch.set_num_threads(threads)
    dtype = choose_dtype(args.dtype, torch.device("cpu"))
    dtype_name = {torch.bfloat16: "bf16", torch.float32: "fp32"}[dtype]
    load_before = load_average()
    print(f"load average before: {load_before}; torch threads on both sides: {threads}", flush=True)

    from transformers import AutoTokenizer

    from posttrain.engine.launcher import EngineProcess, ServeOptions
    from posttrain.engine.models import resolve_model

    source = resolve_model(args.model)
    tokenizer = AutoTokenizer.from_pretrained(source.path)
    n_batches = args.warmup + args.blocks * args.steps_per_block
    batches = real_text_batches(tokenizer, n_batches, args.batch, args.seq_len)
    tokens_per_step = args.batch * args.seq_len

    plain = PlainLoop(str(source.path), args.rank, args.lr, dtype)
    cfg = plain.config
    d_attn = cfg.num_attention_heads * getattr(cfg, "head_dim", cfg.hidden_size // cfg.num_attention_heads)
    # Training FLOPs per token for LoRA: forward 2N over the base matmul weights, backward through the
    # activations 2N (no weight gradient for frozen base weights): 4N. Plus the LoRA factors themselves at the
    # usual 6 x params, plus causal attention (QK^T and AV over T/2 keys on average: 2*L*T*d forward, twice that
    # backward).
    attn_flops = 6 * cfg.num_hidden_layers * args.seq_len * d_attn
    flops_per_token = 4 * plain.n_matmul + 6 * plain.n_lora + attn_flops

    log_dir = tempfile.mkdtemp(prefix="bench-sft-")
    options = ServeOptions(
        models=[args.model] if args.model else None,
        checkpoint_dir=os.path.join(log_dir, "checkpoints"),
        dtype=dtype_name,
        api_key=API_KEY,
        threads=threads,
    )
    engine = EngineProcess(
        options,
        log_file=os.path.join(log_dir, "engine.log"),
        env={"PYTHONPATH": os.path.abspath(args.engine_src)} if args.engine_src else None,
    )
    url = engine.start()
    print(f"engine at {url} (log: {log_dir}/engine.log)", flush=True)
    try:
        remote = EngineLoop(url, source.name, args.rank, args.lr)
        # Warm-up; the first step of each starts from the base model (B = 0), so the losses must agree.
        first_loss = {}
        for i in range(args.warmup):
            e = remote.step(batches[i])
            p = plain.step(batches[i])
            if i == 0:
                first_loss = {"engine": e / tokens_per_step, "plain": p / tokens_per_step}
        print(
            f"first-step loss per token: engine {first_loss['engine']:.4f}, plain {first_loss['plain']:.4f}",
            flush=True,
        )

        step_times: dict[str, list[float]] = {"engine": [], "plain": []}
        block_medians: dict[str, list[float]] = {"engine": [], "plain": []}
        peaks: list[float] = []
        loads: list[list[float]] = []
        sides = {"engine": remote, "plain": plain}
        cursor = args.warmup
        for block in range(args.blocks):
            peaks.append(matmul_gflops(dtype))
            order = ["engine", "plain"] if block % 2 == 0 else ["plain", "engine"]
            for side in order:
                times = []
                for k in range(args.steps_per_block):
                    t0 = time.perf_counter()
                    sides[side].step(batches[cursor + k])
                    times.append(time.perf_counter() - t0)
                step_times[side] += times
                block_medians[side].append(median(times))
            cursor += args.steps_per_block
            loads.append(load_average())
            print(
                f"block {block + 1}/{args.blocks}: engine {block_medians['engine'][-1]:.2f} s/step, "
                f"plain {block_medians['plain'][-1]:.2f} s/step, {dtype_name} matmul {peaks[-1]:.0f} GFLOP/s, "
                f"load {loads[-1]}",
                flush=True,
            )
        fp32_peak = matmul_gflops(torch.float32)
        engine_peak_rss = peak_rss_mb(engine.proc.pid if engine.proc else None)
    finally:
        engine.stop()

    load_after = load_average()
    peak = median(peaks)
    summary = {}
    for side in ("engine", "plain"):
        s = median(step_times[side])
        tps = tokens_per_step / s
        summary[side] = {
            "median_step_s": round(s, 3),
            "min_step_s": round(min(step_times[side]), 3),
            "tokens_per_s": round(tps, 1),
            "achieved_gflops": round(tps * flops_per_token / 1e9, 1),
            "fraction_of_matmul_peak": round(tps * flops_per_token / 1e9 / peak, 3),
            "step_times_s": [round(t, 3) for t in step_times[side]],
        }
    ratio = summary["engine"]["tokens_per_s"] / summary["plain"]["tokens_per_s"]
    # Per-block ratio: each block pair ran back to back, so it is the least load-sensitive view.
    block_ratios = [p / e for e, p in zip(block_medians["engine"], block_medians["plain"], strict=True)]

    results = {
        "benchmark": "sft",
        "machine": machine_info(),
        "command": " ".join(["uv run python", *sys.argv]),
        "config": {
            "model": source.name,
            "batch": args.batch,
            "seq_len": args.seq_len,
            "tokens_per_step": tokens_per_step,
            "rank": args.rank,
            "lora_alpha": 32,
            "target_modules": len(plain.targets),
            "threads": threads,
            "dtype": dtype_name,
            "engine_src": args.engine_src,
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
            "gomp_spincount": os.environ.get("GOMP_SPINCOUNT"),
            "warmup_steps": args.warmup,
            "blocks": args.blocks,
            "steps_per_block": args.steps_per_block,
        },
        "flops": {
            "formula": "4*N_matmul + 6*N_lora + 6*L*T*d_attn per token",
            "n_matmul_params": plain.n_matmul,
            "n_lora_params": plain.n_lora,
            "per_token": flops_per_token,
        },
        "first_step_loss_per_token": first_loss,
        "matmul_gflops": {
            "dtype": dtype_name,
            "median": round(peak, 1),
            "per_block": [round(x, 1) for x in peaks],
        },
        "engine_peak_rss_mb": engine_peak_rss,
        "fp32_matmul_gflops": round(fp32_peak, 1),
        "engine": summary["engine"],
        "plain": summary["plain"],
        "ratio_engine_over_plain": round(ratio, 3),
        "block_ratios_engine_over_plain": [round(r, 3) for r in block_ratios],
        "target_ratio": 0.9,
        "target_met": ratio >= 0.9,
        "load_average": {"before": load_before, "per_block": loads, "after": load_after},
    }
    path = write_results(args.name, results)

    rows = [
        [
            side,
            f"{summary[side]['median_step_s']:.2f}",
            f"{summary[side]['tokens_per_s']:.0f}",
            f"{summary[side]['achieved_gflops']:.0f}",
            f"{100 * summary[side]['fraction_of_matmul_peak']:.0f}%",
        ]
        for side in ("engine", "plain")
    ]
    print()
    print(
        f"SFT, {source.name}, LoRA r={args.rank}, {args.batch} x {args.seq_len} tokens/step, "
        f"{dtype_name}, {threads} thread(s), {args.blocks} x {args.steps_per_block} timed steps per side"
    )
    print()
    print(
        markdown_table(
            ["side", "median s/step", "tokens/s", "GFLOP/s (est.)", f"of {dtype_name} matmul rate"],
            rows,
        )
    )
    print()
    print(f"engine / plain tokens/s: **{ratio:.2f}** (target >= 0.9: {'met' if ratio >= 0.9 else 'NOT met'})")
    print(f"per-block ratios: {', '.join(f'{r:.2f}' for r in block_ratios)}")
    print(
        f"{dtype_name} matmul 2048^3: {peak:.0f} GFLOP/s (median of {len(peaks)}; fp32 {fp32_peak:.0f}); "
        f"{flops_per_token / 1e6:.0f} MFLOP/token "
        f"(4*{plain.n_matmul / 1e6:.1f}M + 6*{plain.n_lora / 1e6:.2f}M + attention)"
    )
    print(f"engine peak RSS (VmHWM): {engine_peak_rss} MB")
    print(f"load average before {load_before}, after {load_after}")
    print(f"results: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
