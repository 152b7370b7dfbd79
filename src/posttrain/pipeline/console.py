"""The terminal belongs to the user: phase lines, progress bars, the result. Everything else goes to a log file.

Libraries write to the terminal in many ways (the cookbook replaces the root logging handlers with its own
console handler, wandb has its own terminal logger, the SDK warns about retries and deprecations, rich prints
per-step tables). Rather than chase each one, `Console.capture` points the process's stdout and stderr file
descriptors at the run's `console.log` for the duration of the run, and the console keeps a private duplicate
of the real terminal for what the user should see. `verbose=true` skips the capture: the full stream again.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from tqdm import tqdm

from posttrain.util import redact

# Metrics shown on the training bar, first found wins per label (SFT, RL, DPO and distillation loops).
_BAR_METRICS = {
    "loss": ("train_mean_nll", "dpo_loss", "loss", "train/loss"),
    # On-policy distillation's reward is 0 by design; its signal is the KL to the teacher.
    "teacher_kl": ("teacher_kl",),
    "reward": ("env/all/reward/total",),
    "accuracy": ("dpo_accuracy", "accuracy"),
}


class Console:
    def __init__(self, verbose: bool = False):
        self.verbose = verbose
        self.log_file: Path | None = None
        self._terminal: IO[str] | None = None  # while output is captured; else sys.stdout as it is then

    def say(self, message: str) -> None:
        # tqdm.write keeps an active progress bar intact (it is redrawn below the line).
        tqdm.write(redact(message), file=self.stream)

    @property
    def stream(self) -> IO[str]:
        """Where progress bars go: the real terminal, also while the rest is captured."""
        return self._terminal or sys.stdout

    @contextlib.contextmanager
    def capture(self, log_file: Path) -> Iterator[None]:
        """Send fd 1 and 2 (and so every library's output) to `log_file` until the block ends."""
        self.log_file = log_file
        if self.verbose:
            yield
            return
        sys.stdout.flush()
        sys.stderr.flush()
        saved_out, saved_err = os.dup(1), os.dup(2)
        streams = sys.stdout, sys.stderr
        terminal = _terminal_of(sys.stdout)
        # The redirection is inside the try: a Ctrl-C landing between it and the block must still give the
        # terminal back, or the "interrupted: ..." line that follows is written into the log instead.
        # Written to a file, print() fills an 8 KB buffer first: whatever it held when the run failed (a full
        # disk) never reached the log, and those are the lines that say what happened. Line by line, then.
        reconfigure = getattr(sys.stdout, "reconfigure", None)  # a test's StringIO has none
        was_line_buffered = getattr(sys.stdout, "line_buffering", None)
        try:
            if reconfigure is not None:
                reconfigure(line_buffering=True)
            log_fd = os.open(log_file, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
            os.dup2(log_fd, 1)
            os.dup2(log_fd, 2)
            os.close(log_fd)
            if terminal is streams[0]:
                # sys.stdout is not fd 1 (posttrain called in-process): the Python streams go to the log too. Left
                # open afterwards: a library's log handler made during the run may still hold it.
                sys.stdout = sys.stderr = open(log_file, "a", buffering=1, encoding="utf-8", errors="replace")  # noqa: SIM115
            self._terminal = terminal
            yield
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            sys.stdout, sys.stderr = streams
            os.dup2(saved_out, 1)
            os.dup2(saved_err, 2)
            os.close(saved_out)
            os.close(saved_err)
            if reconfigure is not None and was_line_buffered is not None:
                reconfigure(line_buffering=was_line_buffered)
            self._terminal = None
            if terminal is not sys.stdout:
                terminal.close()

    def progress(self, total: int | None, desc: str) -> tqdm:
        return tqdm(total=total, desc=desc, file=self.stream, dynamic_ncols=True, leave=True)

    async def follow_training(
        self, metrics_file: Path, total_steps: int | None, desc: str = "training"
    ) -> None:
        """Show a bar (step k/N, loss or reward, tokens/s, ETA) from the cookbook's metrics.jsonl as it grows.

        The cookbook loops take no progress callback, but each one appends a line per step to metrics.jsonl.
        Runs until cancelled. The bar appears when the loop has started (it writes config.json first): work a
        method does before its loop (off-policy distillation's teacher answering the training prompts, with
        its own bar) would otherwise count as the first step and make the ETA wrong.
        """
        while not (metrics_file.parent / "config.json").exists() and not metrics_file.exists():
            await asyncio.sleep(0.5)
        bar = self.progress(total_steps, desc)
        # Steps already logged (a resumed run) move the bar but not the token rate.
        offset, backlog = _read_new_lines(metrics_file, 0)
        for row in backlog:
            if _is_number(row.get("step")) and _is_training_row(row):
                bar.update(max(0, int(row["step"]) + 1 - bar.n))
        started, tokens = time.monotonic(), 0.0

        def advance() -> None:
            nonlocal offset, tokens
            offset, rows = _read_new_lines(metrics_file, offset)
            for row in rows:
                if not _is_number(row.get("step")) or not _is_training_row(row):
                    continue
                tokens += float(row["num_tokens"]) if _is_number(row.get("num_tokens")) else 0.0
                bar.set_postfix(_postfix(row, tokens / max(time.monotonic() - started, 1e-6)), refresh=False)
                # Position by step number: a resumed run's log already holds the earlier steps.
                bar.update(max(0, int(row["step"]) + 1 - bar.n))

        try:
            while True:
                advance()
                await asyncio.sleep(0.5)
        finally:
            advance()  # the loop's last steps may land between two polls and the cancellation
            bar.close()


def _terminal_of(stdout: IO[str]) -> IO[str]:
    """Where the user reads while fd 1 and 2 go to the log: a private copy of fd 1, or, when sys.stdout is not fd 1
    (a notebook's cell output, a program that redirected it, `posttrain` called in-process), sys.stdout itself."""
    try:
        is_fd_1 = stdout.fileno() == 1
    except (AttributeError, OSError, ValueError):  # io.UnsupportedOperation is an OSError and a ValueError
        is_fd_1 = False
    if not is_fd_1:
        return stdout
    return os.fdopen(os.dup(1), "w", buffering=1, encoding="utf-8", errors="replace")


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _is_training_row(row: dict[str, Any]) -> bool:
    # The loops also write evaluation-only rows; a training step carries a training metric or its timing.
    return any(k.startswith(("train", "env/", "time/step", "time/total", "dpo")) for k in row)


def _postfix(row: dict[str, Any], tokens_per_s: float) -> dict[str, str]:
    shown: dict[str, str] = {}
    for label, keys in _BAR_METRICS.items():
        value = next((row[k] for k in keys if _is_number(row.get(k))), None)
        if value is not None:
            shown[label] = f"{value:.3g}"
    if "teacher_kl" in shown:
        shown.pop("reward", None)
    if tokens_per_s > 0:
        shown["tok/s"] = f"{tokens_per_s:.0f}"
    return shown


def _read_new_lines(path: Path, offset: int) -> tuple[int, list[dict[str, Any]]]:
    """Complete JSON lines appended since `offset` (a half-written last line waits for the next call)."""
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            chunk = f.read()
    except FileNotFoundError:
        return offset, []
    end = chunk.rfind(b"\n") + 1
    rows = []
    for line in chunk[:end].splitlines():
        with contextlib.suppress(ValueError):
            row = json.loads(line)
            if isinstance(row, dict):
                rows.append(row)
    return offset + end, rows


# One terminal per process: the run, the evaluators and the method modules all report through this one.
CONSOLE = Console()
