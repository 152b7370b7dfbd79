"""Running `train.py` as a user does, for the end-to-end tests: a real subprocess, W&B offline, the Hub offline."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def train(
    args: list[str],
    cwd: Path,
    extra_env: dict[str, str] | None = None,
    timeout: int = 900,
    unset: tuple[str, ...] = (),
):
    env = {**os.environ, "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1", **(extra_env or {})}
    for name in unset:
        env.pop(name, None)
    return subprocess.run(
        [sys.executable, str(REPO / "train.py"), *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
