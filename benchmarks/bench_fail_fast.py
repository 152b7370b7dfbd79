"""How fast bad input is reported: wall time of `train.py` from start to its one-line error, per kind of input.

Target: at most 3 s for a bad setting, a missing or malformed file, an unknown model or environment, a results
folder that is a file; at most 30 s for a service that cannot be reached. Each case runs in a fresh folder
(nothing to lose) as a user runs it: `python train.py ...` in a subprocess, the Hub offline.

    uv run python benchmarks/bench_fail_fast.py
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import REPO_ROOT, load_average, machine_info

CASES: list[tuple[str, list[str], float]] = [
    ("unsupported setting", ["max_grad_norm=1.0"], 3.0),
    ("malformed value", ["batch_size=abc"], 3.0),
    ("missing data file", ["dataset=/nonexistent/data.jsonl"], 3.0),
    ("malformed row", ["dataset={bad}"], 3.0),
    ("model not servable offline", ["model_name=nobody/nothing"], 3.0),
    ("results_dir is a file", ["results_dir={blocked}"], 3.0),
    ("unknown reasoning-gym task", ["env=reasoning_gym:no_such_task"], 3.0),
    ("nothing listening at base_url", ["base_url=http://127.0.0.1:9", "backend=local"], 30.0),
]


def main() -> None:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        bad = Path(tmp) / "bad.jsonl"
        bad.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "c", "completion": \n')
        blocked = Path(tmp) / "blocked"
        blocked.write_text("a file")
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"}
        for name, args, limit in CASES:
            args = [a.format(bad=bad, blocked=blocked) for a in args]
            times = []
            for _ in range(3):
                started = time.monotonic()
                proc = subprocess.run(
                    [sys.executable, str(REPO_ROOT / "train.py"), *args],
                    cwd=tmp,
                    env=env,
                    capture_output=True,
                    text=True,
                    timeout=120,
                )
                times.append(time.monotonic() - started)
                assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, (
                    name,
                    proc.stderr,
                )
            best = min(times)
            rows.append(
                {
                    "case": name,
                    "seconds_best_of_3": round(best, 2),
                    "limit": limit,
                    "ok": best <= limit,
                    "error": proc.stderr.strip()[:160],
                }
            )
            print(f"{name:32s} {best:6.2f} s (limit {limit:g} s) {'ok' if best <= limit else 'SLOW'}")
    report = {"machine": machine_info(), "load_average": load_average(), "cases": rows}
    out = Path(__file__).resolve().parent / "results" / "fail_fast.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
