"""Peak resident memory of a whole run, per process and per phase: `train.py` (the default run) as a user starts it.

Runs `python train.py ARGS...` in a fresh results directory, and every 0.5 s reads VmRSS of the client (the
pipeline, cookbook, SDK, wandb) and of every process below it (the local engine, wandb's service), naming each
by its command line. Phases come from the client's own progress lines (`engine: ready`, the base evaluation,
training, the trained evaluation), timestamped as they are printed. At the end each process's VmHWM (its true
peak, which 0.5 s samples can miss) is read just before it exits, where possible.

    uv run python benchmarks/bench_memory.py                          # the default run (~3-4 min)
    uv run python benchmarks/bench_memory.py --name memory_default -- steps=2   # extra train.py arguments after --

Writes benchmarks/results/<name>.json (timeline, per-phase and per-process peaks) and prints a table.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from _common import REPO_ROOT, load_average, machine_info, markdown_table, write_results

INTERVAL = 0.5

# The client's progress line (stdout) that starts each phase: its first occurrence.
PHASES: list[tuple[str, re.Pattern[str]]] = [
    ("engine start", re.compile(r"^engine: starting")),
    ("base eval", re.compile(r"^engine: ready")),
    ("training", re.compile(r"^base model: held-out")),
    ("trained eval", re.compile(r"^training: 100%")),
    ("results", re.compile(r"^trained model: held-out")),
]


def read_status(pid: int) -> dict[str, int] | None:
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    out = {}
    for key in ("VmRSS", "VmHWM"):
        m = re.search(rf"^{key}:\s+(\d+) kB", text, re.M)
        if m:
            out[key] = int(m.group(1)) // 1024  # MB (MiB)
    return out


def read_pss(pid: int) -> int | None:
    """Proportional set size in MB: each shared page (torch's libraries, mapped by the client and the engine
    alike) counted once across the processes that map it, so the sum over processes is the run's memory."""
    try:
        text = Path(f"/proc/{pid}/smaps_rollup").read_text()
    except OSError:
        return None
    m = re.search(r"^Pss:\s+(\d+) kB", text, re.M)
    return int(m.group(1)) // 1024 if m else None


def children(pid: int) -> list[int]:
    """Every descendant of pid (through /proc/*/task/*/children)."""
    out: list[int] = []
    todo = [pid]
    while todo:
        p = todo.pop()
        for task in Path(f"/proc/{p}/task").glob("*") if Path(f"/proc/{p}/task").exists() else []:
            try:
                kids = [int(x) for x in (task / "children").read_text().split()]
            except OSError:
                continue
            out += kids
            todo += kids
    return out


def role(pid: int) -> str:
    try:
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return "?"
    if "posttrain.engine.serve" in cmd:
        return "engine"
    if "wandb" in cmd:
        return "wandb"
    if "train.py" in cmd:
        return "client"
    return cmd.split(" ")[0].rsplit("/", 1)[-1] or "?"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--name", default="memory", help="results file name (benchmarks/results/NAME.json)")
    parser.add_argument(
        "--results-dir", default=None, help="train.py's results_dir (default: a temporary one)"
    )
    parser.add_argument("train_args", nargs="*", help="extra train.py key=value arguments (after --)")
    args = parser.parse_args()

    tmp = tempfile.TemporaryDirectory(prefix="posttrain-bench-memory-")
    results_dir = args.results_dir or tmp.name
    cmd = [sys.executable, "train.py", f"results_dir={results_dir}", *args.train_args]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    t0 = time.monotonic()
    proc = subprocess.Popen(
        cmd, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env
    )
    lines: list[tuple[float, str]] = []

    def reader() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append((time.monotonic() - t0, line.rstrip()))
            sys.stdout.write(line)
            sys.stdout.flush()

    threading.Thread(target=reader, daemon=True).start()
    samples: list[dict] = []  # {t, pid, role, rss}
    hwm: dict[int, dict] = {}  # the last VmHWM read of each process (it only grows)
    roles: dict[int, str] = {}
    load_before = load_average()
    while proc.poll() is None:
        t = time.monotonic() - t0
        for pid in [proc.pid, *children(proc.pid)]:
            status = read_status(pid)
            if status is None:
                continue
            if roles.get(pid, "?") == "?":  # a child between fork and exec has no command line yet
                roles[pid] = role(pid)
            if "VmHWM" not in status:  # exiting: its memory is gone, and so is its record of the peak
                continue
            pss = read_pss(pid)
            samples.append(
                {"t": round(t, 2), "pid": pid, "role": roles[pid], "rss": status["VmRSS"], "pss": pss or 0}
            )
            hwm[pid] = {"role": roles[pid], "hwm": status["VmHWM"]}
        time.sleep(INTERVAL)
    wall = time.monotonic() - t0
    time.sleep(0.2)

    # Phase boundaries from the client's progress lines.
    starts: list[tuple[float, str]] = [(0.0, "start-up")]
    for phase, pattern in PHASES:
        t = next((t for t, line in lines if pattern.search(line.strip())), None)
        if t is not None:
            starts.append((t, phase))
    starts.sort()

    def phase_at(t: float) -> str:
        current = starts[0][1]
        for start, phase in starts:
            if t >= start:
                current = phase
        return current

    per_phase: dict[str, dict[str, int]] = {}
    for s in samples:
        phase = phase_at(s["t"])
        row = per_phase.setdefault(phase, {})
        row[s["role"]] = max(row.get(s["role"], 0), s["rss"])
    # Sum over processes at each sample time: the run's resident total.
    totals: dict[float, int] = {}
    pss_totals: dict[float, int] = {}
    for s in samples:
        totals[s["t"]] = totals.get(s["t"], 0) + s["rss"]
        pss_totals[s["t"]] = pss_totals.get(s["t"], 0) + s["pss"]
    peak_total_t, peak_total = max(totals.items(), key=lambda kv: kv[1]) if totals else (0.0, 0)
    peak_pss_t, peak_pss = max(pss_totals.items(), key=lambda kv: kv[1]) if pss_totals else (0.0, 0)
    by_role: dict[str, int] = {}
    for info in hwm.values():
        by_role[info["role"]] = max(by_role.get(info["role"], 0), info["hwm"])

    roles_seen = sorted({s["role"] for s in samples})
    table = markdown_table(
        ["phase (from)", *[f"{r} RSS max MB" for r in roles_seen]],
        [
            [f"{phase} ({start:.0f} s)", *[per_phase.get(phase, {}).get(r, "-") for r in roles_seen]]
            for start, phase in starts
        ],
    )
    summary = markdown_table(
        ["process", "peak RSS (VmHWM, last read) MB"], [[r, v] for r, v in sorted(by_role.items())]
    )
    print()
    print(table)
    print()
    print(summary)
    print(
        f"\nsum of processes' RSS at its highest sample: {peak_total} MB at {peak_total_t:.0f} s; "
        f"sum of their PSS (shared pages once): {peak_pss} MB at {peak_pss_t:.0f} s; wall {wall:.0f} s; "
        f"exit code {proc.returncode}"
    )
    path = write_results(
        args.name,
        {
            "benchmark": "memory",
            "machine": machine_info(),
            "command": "uv run python benchmarks/bench_memory.py " + " ".join(sys.argv[1:]),
            "train_command": " ".join(["python", *cmd[1:]]),
            "exit_code": proc.returncode,
            "wall_s": round(wall, 1),
            "load_average_before": load_before,
            "load_average_after": load_average(),
            "peak_rss_mb_by_process": by_role,
            "peak_sum_rss_mb": peak_total,
            "peak_sum_at_s": peak_total_t,
            "peak_sum_pss_mb": peak_pss,
            "peak_sum_pss_at_s": peak_pss_t,
            "phases": [
                {"phase": p, "start_s": round(t, 1), "max_rss_mb": per_phase.get(p, {})} for t, p in starts
            ],
            "progress_lines": [{"t": round(t, 1), "line": line} for t, line in lines],
            "samples": samples,
        },
    )
    print(f"wrote {path}")
    tmp.cleanup()
    sys.exit(proc.returncode)


if __name__ == "__main__":
    main()
