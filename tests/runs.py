"""Running `train.py` as a user does, for the end-to-end tests: a real subprocess, W&B offline, the Hub offline."""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import signal
import subprocess
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# Exit codes of a run that finished, whatever its verdict: improved, not improved, inconclusive, guard regressed.
FINISHED = (0, 1, 3, 4)


# The quickest RL run on the tiny model that still trains one step and evaluates a few held-out problems.
FAST_RL = [
    "renderer_name=role_colon",
    "batch_size=2",
    "group_size=2",
    "max_steps=1",
    "max_tokens=8",
    "max_eval_rows=4",
    "save_every=0",
    "eval_every=0",
    "lora_rank=4",
    "eval_concurrency=8",
]

# The guard set (64 conversations, scored for both models) costs a run seconds: runs of tests that are not about
# the guard leave it out; a test about it gives guard= or guard_dataset= itself (and the gallery keeps it).
GUARD_KEYS = ("guard=", "guard_dataset=")


def without_guard(args: list[str]) -> list[str]:
    return list(args) if any(a.startswith(GUARD_KEYS) for a in args) else [*args, "guard=false"]


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
        [sys.executable, str(REPO / "train.py"), *without_guard(args)],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def train_here(
    args: list[str], cwd: Path, extra_env: dict[str, str] | None = None, unset: tuple[str, ...] = ()
) -> subprocess.CompletedProcess[str]:
    """`train.py ARGS` in this process (see `cli_here`)."""
    return cli_here(["train", *without_guard(args)], cwd, extra_env, unset)


def cli_here(
    argv: list[str], cwd: Path, extra_env: dict[str, str] | None = None, unset: tuple[str, ...] = ()
) -> subprocess.CompletedProcess[str]:
    """`posttrain ARGV` in this process: the CLI's own code from argv to exit code, less the interpreter start-up
    and imports a subprocess pays (~10 s of CPU a run, most of a tiny run's cost). For refusals, and for whole runs
    whose subject is a method, an environment or an after-training command (on the session's engine, by base_url=,
    or one the command starts); what is about the process itself (signals, keys from .env, the engine it starts,
    `train.py`) stays a real subprocess (`train`, `posttrain`). The console's lines reach the captured stdout and
    library output the run's console.log, as in a terminal (`Console.capture`). An exception the CLI lets through
    fails the test with its traceback, as it would reach a user's terminal. The process's environment, working
    directory, signal handlers and logging are restored afterwards."""
    from posttrain.cli.main import main

    saved_env, saved_cwd = dict(os.environ), os.getcwd()
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    out, err = io.StringIO(), io.StringIO()
    try:
        os.environ.update({"WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1", **(extra_env or {})})
        for name in unset:
            os.environ.pop(name, None)
        os.chdir(cwd)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), warnings.catch_warnings():
            code = main(argv)
    finally:
        logging.disable(logging.NOTSET)  # the CLI silences library logging after a stopped run
        os.chdir(saved_cwd)
        os.environ.clear()
        os.environ.update(saved_env)
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    return subprocess.CompletedProcess(["posttrain", *argv], code, out.getvalue(), err.getvalue())


def posttrain(argv: list[str], cwd: Path, extra_env: dict[str, str] | None = None, stdin: str | None = None):
    """`posttrain ARGV` as a user runs it: a real subprocess, W&B and the Hub offline."""
    env = {**os.environ, "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1", **(extra_env or {})}
    if argv[:1] == ["train"]:
        argv = ["train", *without_guard(argv[1:])]
    return subprocess.run(
        [sys.executable, "-m", "posttrain.cli.main", *argv],
        cwd=cwd,
        env=env,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=600,
    )


@dataclass
class Finished:
    """A `train.py` subprocess that has ended: where it ran and what it said."""

    cwd: Path
    returncode: int
    stdout: str
    stderr: str


def start_with_keys_file(args: list[str], cwd: Path, env_file: str, hub: Path) -> subprocess.Popen:
    """`train.py ARGS` started in `cwd` as a paying user starts it: the keys only from `cwd/.env` (`env_file`),
    W&B and the Hub offline, tokenizers (and image processors) from the hub cache `hub`."""
    cwd.mkdir(parents=True, exist_ok=True)
    (cwd / ".env").write_text(env_file)
    env = {**os.environ, "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(hub)}
    for name in ("TINKER_API_KEY", "WANDB_API_KEY", "WANDB_PROJECT", "TINKER_BASE_URL"):
        env.pop(name, None)  # the keys come from .env, as for a user
    return subprocess.Popen(
        [sys.executable, str(REPO / "train.py"), *without_guard(args)],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_all(started: dict[str, tuple[Path, subprocess.Popen]], timeout: int) -> dict[str, Finished]:
    """Each run started at once (most of a run's time is imports: they overlap), waited for in turn; one that
    outlives `timeout` is killed and reported as it ended."""
    finished = {}
    for key, (cwd, proc) in started.items():
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
        finished[key] = Finished(cwd, proc.returncode, out, err)
    return finished


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def data_error(call) -> str:
    """The message of the DataError `call` raises; the CLI prints it as one line, so it must be one."""
    import pytest

    from posttrain.errors import DataError

    with pytest.raises(DataError) as info:
        call()
    message = str(info.value)
    assert "\n" not in message
    return message


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def rl_results(results: Path) -> tuple[dict, list[dict], list[dict]]:
    """A finished run's summary.json and its base/trained rows in the RL schema, each checked against its schema."""
    from posttrain.pipeline.results import validate_rows, validate_summary

    summary = json.loads((results / "summary.json").read_text())
    validate_summary(summary)
    base, trained = read_jsonl(results / "base_model.jsonl"), read_jsonl(results / "trained_model.jsonl")
    validate_rows(base, "score", "rl")
    validate_rows(trained, "score", "rl")
    return summary, base, trained
