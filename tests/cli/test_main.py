"""The `posttrain` command itself: what any subcommand does when its reader goes away."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def test_output_into_a_closed_pipe_stops_quietly(tmp_path: Path):
    """`posttrain examples list | head -0`: the listing meets a pipe whose reader has gone, which must end the
    command as a broken pipe ends a shell tool (exit 141), with no traceback on the terminal."""
    read_end, write_end = os.pipe()
    os.close(read_end)  # closed before the command starts, so its first write finds no reader, every time
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "posttrain.cli.main", "examples", "list"],
        cwd=tmp_path,
        env=env,
        stdout=write_end,
        stderr=subprocess.PIPE,
        text=True,
        timeout=120,
    )
    os.close(write_end)
    assert proc.returncode == 141, proc.stderr
    assert "Traceback" not in proc.stderr and "BrokenPipeError" not in proc.stderr, proc.stderr
