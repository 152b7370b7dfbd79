"""Continuing a stopped run (`resume=true run_name=X`): what may be continued, what is kept, the command.

The cookbook loops continue from the last checkpoint in their log directory by themselves; this module keeps
the rest of the run consistent: the base model's evaluation is reused (it cannot have changed), and the
metrics of steps the loop will redo are dropped so `metrics.jsonl` reads as one run.
"""

from __future__ import annotations

import shlex
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from posttrain.errors import ConfigError
from posttrain.pipeline import results
from posttrain.util import read_jsonl, write_jsonl


def check_resumable(store: results.ResultsDir, run_name: str) -> None:
    log_path = store.log_dir(run_name)
    if not log_path.is_dir():
        raise ConfigError(f"resume=true: there is no run {run_name!r} to continue ({log_path} not found)")
    summary = store.read_summary()
    if summary.get("run_name") == run_name and summary.get("status") == "completed":
        raise ConfigError(f"resume=true: run {run_name!r} already completed (see {store.path})")


def resume_command(run_name: str) -> str:
    """The command line that continues this run: the same settings, with run_name and resume=true."""
    given = sys.argv[1:]
    if given[:1] == ["train"]:  # `posttrain train ...`: train.py takes the settings alone
        given = given[1:]
    kept = [a for a in given if not a.lstrip("-").startswith(("resume=", "run_name="))]
    return " ".join(
        ["uv run python train.py", *map(shlex.quote, kept), f"run_name={run_name}", "resume=true"]
    )


def earlier_base_evaluation(
    store: results.ResultsDir, run_name: str, say: Callable[[str], None]
) -> tuple[list[Any] | None, float | None]:
    """The base model's evaluation from the stopped run, if it finished before the stop."""
    earlier = store.read_summary()
    base_file = store.path / results.BASE_FILE
    if earlier.get("run_name") != run_name or earlier.get("baseline") is None or not base_file.is_file():
        return None, None
    say("base model: evaluated before the interruption (kept)")
    return read_jsonl(base_file), float(earlier["baseline"])


def stage_finished(log_path: Path) -> bool:
    """Whether a training loop (one stage of a several-stage run) got to its final checkpoint."""
    from tinker_cookbook import checkpoint_utils

    record = checkpoint_utils.get_last_checkpoint(str(log_path), required_key="sampler_path")
    return record is not None and record.name == "final"


def forget_steps_after_last_checkpoint(log_path: Path, say: Callable[[str], None]) -> None:
    """The cookbook resumes at its last saved state and redoes the steps after it: drop their metrics rows
    first, so metrics.jsonl reads as one run."""
    from tinker_cookbook import checkpoint_utils

    record = checkpoint_utils.get_last_checkpoint(str(log_path))
    metrics_file = log_path / "metrics.jsonl"
    if not metrics_file.is_file():
        return
    resume_step = int(record.name) if record is not None and record.name.isdigit() else 0
    rows = [
        r
        for r in read_jsonl(metrics_file)
        if not (isinstance(r.get("step"), int) and r["step"] >= resume_step)
    ]
    write_jsonl(metrics_file, rows)
    say(f"training: continuing from step {resume_step} ({log_path / 'checkpoints.jsonl'})")


def set_aside_damaged_checkpoint(log_path: Path, exc: BaseException, say: Callable[[str], None]) -> bool:
    """When the loop could not load its last checkpoint because the engine found it damaged, move that checkpoint's
    record to checkpoints_damaged.jsonl, so that the loop continues from the one before it (or from the start);
    False when `exc` is something else."""
    file = log_path / "checkpoints.jsonl"
    records = _read(file)
    saved = [i for i, r in enumerate(records) if r.get("state_path")]
    if not saved or f"{records[saved[-1]]['state_path']} is damaged" not in str(exc):
        return False
    damaged = records.pop(saved[-1])
    write_jsonl(
        log_path / "checkpoints_damaged.jsonl", [*_read(log_path / "checkpoints_damaged.jsonl"), damaged]
    )
    write_jsonl(file, records)
    reason = str(exc).split(" is damaged: ", 1)[1].split(" for self.request_id", 1)[0]
    before = f"checkpoint {records[saved[-2]]['name']}" if len(saved) > 1 else "the start"
    say(f"training: checkpoint {damaged.get('name')} is damaged ({reason}); continuing from {before}")
    forget_steps_after_last_checkpoint(log_path, say)
    return True


def _read(path: Path) -> list[dict]:
    return read_jsonl(path) if path.is_file() else []
