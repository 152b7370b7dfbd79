"""The engine's start: seconds from `posttrain serve` to its ready line, and the CPU it spent, with scikit-learn kept
out of transformers' start-up (`lean_imports.skip_unused_sklearn`, what serve does) against the same start with
that step made a no-op. Side by side, interleaved, on the tiny model (so the imports are most of the start).

    uv run python benchmarks/bench_engine_start.py [pairs]
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import RESULTS_DIR, load_average, machine_info

SERVE = """import sys, posttrain.lean_imports as lean
{switch}from posttrain.engine.serve import main
sys.exit(main(["--model", {model!r}, "--port", "0", "--dtype", "fp32"]))
"""


def start(model: str, skip: bool) -> tuple[float, float]:
    """(seconds to the ready line, CPU seconds the engine process spent until then)."""
    code = SERVE.format(switch="" if skip else "lean.skip_unused_sklearn = lambda: None\n", model=model)
    started = time.monotonic()
    proc = subprocess.Popen(
        [sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    assert proc.stdout is not None
    for line in proc.stdout:
        if line.startswith("posttrain engine ready"):
            break
    ready = time.monotonic() - started
    fields = Path(f"/proc/{proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
    cpu = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    proc.terminate()
    proc.wait()
    return ready, cpu


def main() -> None:
    from posttrain.engine.tiny import make_tiny_model

    pairs = int(sys.argv[1]) if len(sys.argv) > 1 else 3
    runs: dict[str, list[tuple[float, float]]] = {"skip": [], "import": []}
    with tempfile.TemporaryDirectory() as tmp:
        model = str(make_tiny_model(Path(tmp) / "tiny"))
        for _ in range(pairs):
            runs["skip"].append(start(model, True))
            runs["import"].append(start(model, False))
    medians = {k: [statistics.median(x[i] for x in v) for i in (0, 1)] for k, v in runs.items()}
    for kind, (ready, cpu) in medians.items():
        print(f"scikit-learn {kind:6s}: ready in {ready:.2f} s, CPU {cpu:.2f} s (median of {pairs})")
    ratio = medians["import"][1] / medians["skip"][1]
    print(f"CPU ratio (imported / skipped): {ratio:.2f}")
    report = {
        "machine": machine_info(),
        "load_average": load_average(),
        "runs": runs,
        "medians": medians,
        "cpu_ratio": round(ratio, 3),
    }
    (RESULTS_DIR / "engine_start.json").write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
