"""The training bar follows the cookbook's metrics.jsonl, and appears only when the loop has started."""

from __future__ import annotations

import asyncio
import io
import json
import os
import subprocess
import sys
from pathlib import Path

from posttrain.pipeline.console import Console


async def _follow(log_dir: Path, steps: int) -> str:
    console = Console()
    console._terminal = io.StringIO()  # the terminal this console writes its bars to
    follower = asyncio.create_task(console.follow_training(log_dir / "metrics.jsonl", steps))
    await asyncio.sleep(1.2)
    # Work before the loop (e.g. a teacher answering the training prompts) shows no training bar yet.
    assert "training" not in console._terminal.getvalue()
    (log_dir / "config.json").write_text("{}")
    with (log_dir / "metrics.jsonl").open("a") as f:
        for step in range(steps):
            f.write(json.dumps({"step": step, "train_mean_nll": 2.0 - step / 10, "num_tokens": 100}) + "\n")
    await asyncio.sleep(1.2)  # the follower looks every 0.5 s
    follower.cancel()
    try:
        await follower
    except asyncio.CancelledError:
        pass
    return console._terminal.getvalue()


def test_training_bar_waits_for_the_loop_and_counts_its_steps(tmp_path: Path) -> None:
    out = asyncio.run(_follow(tmp_path, 3))
    assert "3/3" in out


def test_on_policy_distillation_bar_shows_the_kl_not_the_zero_reward() -> None:
    from posttrain.pipeline.console import _postfix

    shown = _postfix({"step": 0, "teacher_kl": 0.362, "env/all/reward/total": 0.0}, 12.0)
    assert shown == {"teacher_kl": "0.362", "tok/s": "12"}


# A run started with its stdout a pipe or a file (nohup, `> out.txt`, CI): Python buffers that stdout 8 KB at a
# time, unless PYTHONUNBUFFERED is set, which the test's own environment may have.
CAPTURED = """
import sys
from pathlib import Path
from posttrain.pipeline.console import Console
log = Path(sys.argv[1])
with Console().capture(log / "console.log"):
    print("a library's line")
    (log / "seen").write_text((log / "console.log").read_text())
"""


def test_each_captured_line_reaches_console_log_as_it_is_written(tmp_path: Path) -> None:
    # What is still buffered when the run fails (a full disk) never reaches the log.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    subprocess.run(
        [sys.executable, "-c", CAPTURED, str(tmp_path)], env=env, stdout=subprocess.PIPE, check=True
    )
    assert (tmp_path / "seen").read_text() == "a library's line\n"
