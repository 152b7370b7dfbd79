"""The results/ folder on disk: atomic, redacted writes and moving a previous run aside.

Files are written atomically (temp file in the same directory + os.replace) and pass through `redact()` first.
`ResultsDir.prepare()` moves a previous run's files to `previous/<its run_name or timestamp>/`; nothing is ever
deleted or silently overwritten. One run at a time writes into a folder (`ResultsDir.single_writer`).
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import errno
import fcntl
import json
import os
import shutil
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from posttrain.errors import ConfigError, NoSpaceError
from posttrain.pipeline.results.rows import as_dict, json_safe
from posttrain.util import atomic_write_text, jsonl_text, redact

BASE_FILE = "base_model.jsonl"
TRAINED_FILE = "trained_model.jsonl"
SUMMARY_FILE = "summary.json"
REPORT_FILE = "report.md"
PLOT_FILE = "training_curves.png"
# Who holds the folder: "run NAME (process PID, started TIME)", removed when the run ends.
LOCK_FILE = ".writer"

# Top-level files that belong to a run (moved aside together by `prepare`).
_ARTIFACT_GLOBS = ("*.json", "*.jsonl", "*.md", "*.png", "*.html")


class ResultsDir:
    """The results folder of one run (`results/` by default)."""

    def __init__(self, path: str | Path = "results"):
        self.path = Path(path)

    def _artifacts(self) -> list[Path]:
        if not self.path.is_dir():
            return []
        found = {
            p
            for g in _ARTIFACT_GLOBS
            for p in self.path.glob(g)
            if p.is_file() and not p.name.startswith(".")
        }
        return sorted(found)

    def _previous_name(self) -> str:
        name = self.read_summary().get("run_name")
        if not isinstance(name, str) or not name.strip() or "/" in name or name in (".", ".."):
            newest = max((p.stat().st_mtime for p in self._artifacts()), default=None)
            stamp = _dt.datetime.fromtimestamp(newest) if newest else _dt.datetime.now()
            name = "run-" + stamp.strftime("%Y%m%d-%H%M%S")
        base = self.path / "previous" / name
        dest, n = base, 2
        while dest.exists():
            dest = base.with_name(f"{base.name}-{n}")
            n += 1
        return dest.name

    def prepare(self, run_name: str | None = None) -> Path | None:
        """Create the folder; move a previous run's files (and an old `logs/<run_name>`) to previous/<name>/.

        The previous run is named by the run_name in its summary.json, else by its files' timestamp; an
        existing previous/<name> is never overwritten (-2, -3, ... are appended). Prints what was moved and
        returns the destination, or None when there was nothing to move.
        """
        self.path.mkdir(parents=True, exist_ok=True)
        files = self._artifacts()
        old_logs = self.log_dir(run_name) if run_name else None
        if old_logs is not None and not (old_logs.is_dir() and any(old_logs.iterdir())):
            old_logs = None
        if not files and old_logs is None:
            return None
        dest = self.path / "previous" / self._previous_name()
        dest.mkdir(parents=True)
        moved = []
        for f in files:
            shutil.move(str(f), str(dest / f.name))
            moved.append(f.name)
        if old_logs is not None:
            (dest / "logs").mkdir()
            shutil.move(str(old_logs), str(dest / "logs" / old_logs.name))
            moved.append(f"logs/{old_logs.name}")
        print(f"Moved the previous run's results ({', '.join(moved)}) to {dest}")
        return dest

    @contextlib.contextmanager
    def single_writer(self, run_name: str) -> Iterator[str | None]:
        """Hold the folder for one run; yields the holder before it when that run died holding it.

        A second run into a folder that a live run holds stops with a `ConfigError` naming that run. The hold
        is the kernel's (flock), so a run that died, however it died (a kill, a power cut), holds nothing; its
        lock file, still naming it, is how the next run knows it died. A run that ends removes the file.
        """
        self.path.mkdir(parents=True, exist_ok=True)
        lock = self.path / LOCK_FILE
        while True:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                holder = os.pread(fd, 4096, 0).decode(errors="replace").strip() or None
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    raise ConfigError(
                        f"results_dir={self.path}: {holder or 'another run'} is writing there; wait for it to "
                        "end, or give this run a results_dir= of its own"
                    ) from None
            except BaseException:
                os.close(fd)
                raise
            # A file opened just before the run holding it ended and removed it: holding it would hold nothing
            # (the next run creates another); open the folder's own again.
            if _same_file(fd, lock):
                break
            os.close(fd)
        try:
            started = _dt.datetime.now().isoformat(timespec="seconds")
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"run {run_name} (process {os.getpid()}, started {started})\n".encode(), 0)
            try:
                yield holder
            finally:
                # Removed while still held, so that no run can take the folder between the removal and the close.
                lock.unlink(missing_ok=True)
        finally:
            os.close(fd)

    def check_usable(self) -> None:
        """Raise `ConfigError` unless the folder is (or can become) a writable directory."""
        if self.path.exists() and not self.path.is_dir():
            raise ConfigError(f"results_dir={self.path}: exists and is not a directory")
        existing = next((p for p in (self.path, *self.path.parents) if p.exists()), Path("."))
        if not os.access(existing, os.W_OK | os.X_OK):
            raise ConfigError(f"results_dir={self.path}: {existing} is not writable")

    def read_summary(self) -> dict[str, Any]:
        """The summary.json in the folder ({} when there is none or it is unreadable)."""
        try:
            summary = json.loads((self.path / SUMMARY_FILE).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}
        return summary if isinstance(summary, dict) else {}

    def log_dir(self, run_name: str) -> Path:
        """results_dir/logs/run_name (the cookbook's log_path)."""
        return self.path / "logs" / run_name

    def write_text(self, name: str, text: str) -> Path:
        return atomic_write_text(self.path / name, redact(text))

    def write_json(self, name: str, obj: Any) -> Path:
        text = json.dumps(json_safe(obj), indent=2, ensure_ascii=False, allow_nan=False)
        return self.write_text(name, text + "\n")

    def write_jsonl(self, name: str, rows: Iterable[Any]) -> Path:
        return self.write_text(name, jsonl_text(json_safe(as_dict(r)) for r in rows))


def _same_file(fd: int, path: Path) -> bool:
    """Whether `path` is still the file open as `fd` (not removed, nor replaced by another)."""
    try:
        found = path.stat()
    except FileNotFoundError:
        return False
    held = os.fstat(fd)
    return (found.st_dev, found.st_ino) == (held.st_dev, held.st_ino)


def no_space(exc: BaseException, folder: Path) -> NoSpaceError | None:
    """A `NoSpaceError` for `exc` when it (or what it was raised from, through libraries that wrap errors) is a
    write that found the disk full; None otherwise. It names the path and the space left on its filesystem."""
    seen: set[int] = set()
    cause: BaseException | None = exc
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        if isinstance(cause, OSError) and cause.errno in (errno.ENOSPC, errno.EDQUOT):
            path = Path(cause.filename) if cause.filename else folder
            where = next((p for p in (path, *path.parents) if p.exists()), Path("."))
            free = shutil.disk_usage(where).free
            return NoSpaceError(
                f"{path}: no space left on the device ({free / 1e6:,.1f} MB free there); what was written before "
                "is intact: free some space, then continue the run with resume=true"
            )
        cause = cause.__cause__ or cause.__context__
    return None
