"""User-defined verifiers: `reward_fn=path/to/file.py:function`.

The function is called as `function(row, completion) -> float` with the problem row (a dict: the dataset's row
for question/answer data, the generated problem for `env=` sources) and the model's completion (str). It is
loaded before anything is spent, so a missing file or function is a one-line error. An exception in it (or a
return value that is not a finite number) never stops a run: the sample scores 0, and the error, with the
verifier's file and line, goes to `verifier_errors.jsonl` in the run's logs and is counted in summary.json.

Calls run in worker processes (a `pebble` process pool), not in the training process, so that a call that
hangs or busy-loops can be stopped: past `verifier_timeout` seconds its worker is killed (and replaced), the
sample scores 0 with "timed out after N s", and the run goes on. A thread could not be stopped, and a busy loop
in the training process would starve the event loop that samples the other rollouts.
"""

from __future__ import annotations

import asyncio
import atexit
import importlib.util
import inspect
import json
import math
import multiprocessing
import os
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from posttrain.errors import ConfigError

ERRORS_FILE = "verifier_errors.jsonl"
DEFAULT_TIMEOUT_S = 10.0
# Verifiers are meant to be quick; a few workers keep concurrent evaluation requests from queueing behind one.
WORKERS = max(1, min(4, os.cpu_count() or 1))


def parse_spec(spec: str, option: str = "reward_fn") -> tuple[Path, str]:
    path, sep, name = spec.rpartition(":")
    if not sep or not path or not name.isidentifier():
        raise ConfigError(f"{option}={spec!r}: expected path/to/file.py:function_name")
    return Path(path).expanduser(), name


def load(spec: str, option: str = "reward_fn") -> Callable[[dict, str], Any]:
    """Import the user's file and return the function, or raise a one-line ConfigError naming what is missing
    and the setting the user wrote (`option`: reward_fn, preference_model, behaviour_check)."""
    path, name = parse_spec(spec, option)
    if not path.is_file():
        raise ConfigError(f"{option}={spec}: file {path} not found")
    module_spec = importlib.util.spec_from_file_location(f"posttrain_user_verifier_{path.stem}", path)
    if module_spec is None or module_spec.loader is None:
        raise ConfigError(f"{option}={spec}: {path} cannot be imported as a Python file")
    module = importlib.util.module_from_spec(module_spec)
    try:
        module_spec.loader.exec_module(module)
    except Exception as exc:  # noqa: BLE001 - the user's file: report where it failed, in one line
        raise ConfigError(f"{option}={spec}: importing {path} failed: {_where(exc, path)}") from None
    fn = getattr(module, name, None)
    if fn is None:
        found = sorted(n for n, v in vars(module).items() if inspect.isfunction(v) and not n.startswith("_"))
        hint = f" (functions there: {', '.join(found)})" if found else ""
        raise ConfigError(f"{option}={spec}: {path} has no function {name!r}{hint}")
    if not callable(fn):
        raise ConfigError(f"{option}={spec}: {name!r} in {path} is not a function")
    return fn


def _where(exc: BaseException, path: Path | None = None) -> str:
    """'file.py:12: ZeroDivisionError: division by zero', naming the deepest frame in the user's file."""
    if isinstance(exc, SyntaxError) and exc.filename:  # raised by the compiler: its frames are importlib's
        return f"{exc.filename}:{exc.lineno}: {type(exc).__name__}: {exc.msg}"[:500]
    frames = traceback.extract_tb(exc.__traceback__)
    target = str(path.resolve()) if path else None
    inside = [f for f in frames if target and str(Path(f.filename).resolve()) == target]
    frame = (inside or frames or [None])[-1]
    location = f"{frame.filename}:{frame.lineno}: " if frame is not None else ""
    return f"{location}{type(exc).__name__}: {exc}"[:500]


def _check_value(value: Any) -> float:
    if isinstance(value, bool):
        value = float(value)
    if not isinstance(value, int | float) or not math.isfinite(value):
        raise TypeError(f"the verifier returned {value!r}, not a finite number")
    return min(1.0, max(0.0, float(value)))


# ------------------------------------------------------------------------------ in the worker processes

_loaded: dict[tuple[str, int], Callable[[dict, str], Any]] = {}


def _watch_parent() -> None:
    # A worker must not outlive the run (killed with SIGKILL, a worker stuck in a user's busy loop would spin
    # on as an orphan): a thread notices the parent is gone (the GIL is switched every few ms, even then).
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(1)

    threading.Thread(target=watch, daemon=True, name="posttrain-parent-watch").start()


def _call(spec: str, row: dict, completion: str, option: str) -> tuple[float | None, str | None]:
    """(reward, None) or (None, 'file.py:line: error'); runs in a worker process."""
    path = parse_spec(spec, option)[0]
    try:
        key = (spec, path.stat().st_mtime_ns)  # a file changed since (a later run in the same process): again
        fn = _loaded.get(key)
        if fn is None:
            fn = _loaded[key] = load(spec, option)
        return _check_value(fn(row, completion)), None
    except Exception as exc:  # noqa: BLE001 - a crashing verifier scores 0, it never stops the run
        return None, str(exc) if isinstance(exc, ConfigError) else _where(exc, path)


# ------------------------------------------------------------------------------ in the training process

_pool: Any = None
_pool_lock = threading.Lock()


def _worker_pool() -> Any:
    """The process pool, started on first use (spawned workers: the training process has threads, and a
    forked copy of it could deadlock) and stopped when the process exits."""
    global _pool
    with _pool_lock:
        if _pool is None:
            from pebble import ProcessPool

            _pool = ProcessPool(
                max_workers=WORKERS, initializer=_watch_parent, context=multiprocessing.get_context("spawn")
            )
            atexit.register(_stop_pool)
        return _pool


def _stop_pool() -> None:
    global _pool
    with _pool_lock:
        pool, _pool = _pool, None
    if pool is not None:
        pool.stop()
        pool.join(timeout=5)


@dataclass
class UserVerifier:
    """The user's function, called in worker processes with a wall-clock timeout, with its error log (appended
    to from the training loop and the evaluations)."""

    spec: str
    errors_file: Path | None = None
    timeout: float = DEFAULT_TIMEOUT_S
    option: str = "reward_fn"  # the setting that named it, for its errors and the log

    def __post_init__(self) -> None:
        # A missing file or function: a one-line error now, in the training process.
        load(self.spec, self.option)
        self.path, name = parse_spec(self.spec, self.option)
        # The workers outlive the run and keep the working directory of the run that started them.
        self._absolute = f"{self.path.resolve()}:{name}"
        self._lock = threading.Lock()

    async def score(self, row: dict, completion: str, phase: str) -> tuple[float, str | None]:
        """(reward in [0, 1], None) or (0.0, 'file.py:line: error') when the verifier failed on this sample
        (an exception, a value that is not a number, a timeout, its process dying)."""
        from pebble import ProcessExpired

        try:
            args = (self._absolute, row, completion, self.option)
            future = _worker_pool().schedule(_call, args=args, timeout=self.timeout)
            value, error = await asyncio.wrap_future(future)
        except TimeoutError:
            value, error = None, f"{self.path}: timed out after {self.timeout:g} s (the call was stopped)"
        except ProcessExpired as exc:
            value, error = None, f"{self.path}: the verifier's process died (exit code {exc.exitcode})"
        except Exception as exc:  # noqa: BLE001 - e.g. a value that cannot be pickled, a pool that cannot start
            value, error = None, f"{self.path}: {type(exc).__name__}: {exc}"[:500]
        if error is not None or value is None:
            self._record(phase, error or "no value")
            return 0.0, error
        return value, None

    def _record(self, phase: str, where: str) -> None:
        import logging

        logging.getLogger("posttrain.verifier").warning(
            "%s error (%s, sample scored 0): %s", self.option, phase, where
        )
        if self.errors_file is None:
            return
        with self._lock, self.errors_file.open("a") as f:
            f.write(json.dumps({"phase": phase, "error": where}) + "\n")


def error_counts(errors_file: Path) -> dict[str, Any]:
    """{phase: count, ..., "first": 'file.py:line: ...'} from the run's verifier_errors.jsonl (empty if none)."""
    if not errors_file.is_file():
        return {}
    counts: dict[str, Any] = {}
    for line in errors_file.read_text().splitlines():
        if line.strip():
            record = json.loads(line)
            counts[record["phase"]] = counts.get(record["phase"], 0) + 1
            counts.setdefault("first", record["error"])
    return counts


def summary(reward_fn: str, errors_file: Path) -> dict[str, Any]:
    """summary.json's record of a user verifier: the function and its errors, by phase."""
    counts = error_counts(errors_file)
    return {
        "reward_fn": reward_fn,
        "verifier_errors": {
            "count": sum(v for k, v in counts.items() if k != "first"),
            "by_phase": {k: v for k, v in counts.items() if k != "first"},
            "first": counts.get("first"),
            "log": str(errors_file),
        },
    }
