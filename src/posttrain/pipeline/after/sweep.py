"""`posttrain sweep KEY=V1,V2,... [seeds=N] [settings]`: a grid of runs, the best setting chosen honestly.

The data is split once, before any run: the held-out rows a run would evaluate on become the sweep's **test**
rows, and a validation part (a tenth of what the runs train on) is set apart from what the runs train on. Every run
trains on the rest and is evaluated on the validation rows (its own verdict there); the best setting is chosen by
its mean validation score over the seeds, and the chosen run is then evaluated **once** on the test rows against
its base model (`posttrain eval`), so the reported number was not used to choose it.

Runs are `posttrain train` subprocesses, one results folder each (sweeps/NAME/runs/ID); on the local engine one at
a time, on Tinker a few at once. A point whose run completed is kept, so the same command after a stop continues.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import signal
import sys
import time
from typing import Any

import chz

from posttrain.config.parse import setting_key
from posttrain.errors import ConfigError, UserError
from posttrain.pipeline.after import evaluate, sweep_report
from posttrain.pipeline.after.sweep_grid import Grid, Point, parse_grid
from posttrain.pipeline.console import CONSOLE
from posttrain.pipeline.data import DataRequest, load_data
from posttrain.pipeline.data.formats import CHAT_FORMATS
from posttrain.pipeline.data.sources import SPLIT_SEED, load_run_data
from posttrain.pipeline.run import run
from posttrain.pipeline.settings import parse_train_args
from posttrain.pipeline.setup import backend
from posttrain.util import read_jsonl, write_jsonl

say = CONSOLE.say
# Where the data came from: the sweep's split applied them; its runs get the split's files instead.
DATA_KEYS = ("dataset", "max_train_rows")
# Runs that finished, whatever their verdict (`posttrain train`'s exit codes 0, 1, 3, 4).
FINISHED = (0, 1, 3, 4)


def sweep(argv: list[str]) -> dict[str, Any]:
    """Plan, split, run the grid, choose, test; returns sweep.json's content."""
    settings, grid = parse_grid(argv)
    say(f"sweep: {len(grid.points)} runs ({_axes_text(grid)}) in {grid.folder}")
    first = parse_train_args([*grid.shared, *grid.points[0].argv()])
    where = backend.choose_backend(first)
    continuing = (grid.data / "split.json").is_file()
    if settings.dry_run or not continuing:  # a stopped sweep was planned when it started
        _plan(first, len(grid.points), where)
    if settings.dry_run:
        return {"dry_run": True, "runs": len(grid.points)}
    split_data(first, grid)
    asyncio.run(_run_all(grid, settings.parallel if where == "tinker" else 1))
    record = sweep_report.collect(grid, first)
    chosen = record.get("chosen")
    if chosen is not None:
        chosen["test"] = _test_chosen(grid, chosen["run"])
    sweep_report.write(grid.folder, record)
    for line in sweep_report.console_lines(record):
        say(line)
    return record


def _axes_text(grid: Grid) -> str:
    return " x ".join(f"{k} {len(v)}" for k, v in grid.axes.items())


def _plan(cfg: Any, runs: int, where: str) -> None:
    """The plan of the first run (`dry_run=true`), times the runs: what the whole grid will take or cost."""
    plan = run(chz.replace(cfg, dry_run=True))
    if where == "tinker":
        usd = (plan.get("tinker_cost") or {}).get("usd")
        text = f"about ${usd * runs:,.2f} for the {runs} runs" if usd is not None else "no published price"
    else:
        text = f"about {_duration(plan['seconds'] * runs)} for the {runs} runs, one at a time"
    say(f"sweep plan: {text} (the first run's plan times {runs}; runs of more steps take longer)")


def _duration(seconds: float) -> str:
    minutes = seconds / 60
    return (
        f"{minutes / 60:.1f} h"
        if minutes >= 90
        else f"{minutes:.0f} min"
        if minutes >= 2
        else f"{seconds:.0f} s"
    )


def split_data(cfg: Any, grid: Grid) -> None:
    """train.jsonl / validation.jsonl / test.jsonl from the run's own data, once (a continued sweep checks that
    what it would write is what is there: another sweep's folder is refused)."""
    data = load_run_data(cfg)
    assert data is not None  # parse_grid refused generated problems
    if data.others:
        raise ConfigError(
            "teacher_model= names several teachers: a sweep splits one dataset; sweep one teacher"
        )
    rows = list(data.train)
    random.Random(SPLIT_SEED + cfg.seed).shuffle(rows)
    # At most a tenth of the rows trained on, as a run takes a given evaluation set (`data.load`), so every
    # run evaluates every validation row.
    size = min(max(1, len(rows) // 11), cfg.max_eval_rows)
    if len(rows) - size < 2:
        raise ConfigError(
            f"dataset: {len(rows)} training rows are too few to set {size} apart for validation"
        )
    parts = {"train": rows[size:], "validation": rows[:size], "test": list(data.eval)}
    marker = grid.data / "split.json"
    facts = {"source": data.source, "format": data.format, **{k: len(v) for k, v in parts.items()}}
    if marker.is_file():
        if json.loads(marker.read_text()) != json.loads(json.dumps(facts)) or any(
            read_jsonl(grid.data / f"{k}.jsonl") != json.loads(json.dumps(v)) for k, v in parts.items()
        ):
            raise ConfigError(f"{grid.folder} holds another sweep's data; give this one name=")
        say(f"sweep: continuing; data as split before in {grid.data}")
        return
    grid.data.mkdir(parents=True, exist_ok=True)
    for part, part_rows in parts.items():
        write_jsonl(grid.data / f"{part}.jsonl", part_rows)
    _check_round_trip(grid, data.format)
    marker.write_text(json.dumps(facts, indent=2) + "\n")
    say(
        f"sweep: {facts['train']} training, {facts['validation']} validation and {facts['test']} test rows "
        f"({data.source}; test: {data.eval_source})"
    )


def _check_round_trip(grid: Grid, fmt: str) -> None:
    """The written rows read back as the same rows of the same kind of data, or the sweep cannot stand for runs
    of the original data."""
    again = load_data(
        DataRequest(
            str(grid.data / "train.jsonl"),
            None,
            "train",
            str(grid.data / "validation.jsonl"),
            None,
            10**9,
            10**9,
            seed=0,
        )
    )
    same_kind = again.format == fmt or {again.format, fmt} <= CHAT_FORMATS
    if not same_kind or again.train != read_jsonl(grid.data / "train.jsonl"):
        raise UserError(f"a sweep of {fmt} rows is not supported: they do not read back the same from a file")


async def _run_all(grid: Grid, parallel: int) -> None:
    """Every point without a completed run, `parallel` at a time; a stop stops the runs (they keep what they
    wrote) and the same command continues."""
    todo = [p for p in grid.points if not _completed(grid, p)]
    if done := len(grid.points) - len(todo):
        say(f"sweep: {done} of {len(grid.points)} runs completed before (kept)")
    gate = asyncio.Semaphore(parallel)
    started = time.monotonic()
    finished: list[float] = []

    async def one(point: Point) -> None:
        async with gate:
            start = time.monotonic()
            code = await _train(grid, point)
            finished.append(time.monotonic() - start)
            left = len(todo) - len(finished)
            eta = f", about {_duration(sum(finished) / len(finished) * left / parallel)} left" if left else ""
            say(f"sweep: {len(finished)}/{len(todo)} {point.id}: {_ending(grid, point, code)}{eta}")

    say(f"sweep: {len(todo)} runs to go" + (f", {parallel} at a time" if parallel > 1 else ""))
    await asyncio.gather(*(one(p) for p in todo))
    say(f"sweep: runs done in {_duration(time.monotonic() - started)}")


def _completed(grid: Grid, point: Point) -> bool:
    summary = grid.results_dir(point) / "summary.json"
    with contextlib.suppress(OSError, ValueError):
        return json.loads(summary.read_text()).get("status") == "completed"
    return False


async def _train(grid: Grid, point: Point) -> int:
    """One run, `posttrain train` in a subprocess, its console in its folder's console.txt."""
    folder = grid.results_dir(point)
    folder.mkdir(parents=True, exist_ok=True)
    shared = [a for a in grid.shared if setting_key(a) not in DATA_KEYS]
    argv = [
        *shared,
        *point.argv(),
        f"dataset={(grid.data / 'train.jsonl').resolve()}",
        f"eval_dataset={(grid.data / 'validation.jsonl').resolve()}",
        f"results_dir={folder}",
        f"run_name={point.id}",
    ]
    with (folder / "console.txt").open("w", encoding="utf-8") as log:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "posttrain.cli.main",
            "train",
            *argv,
            stdout=log,
            stderr=asyncio.subprocess.STDOUT,
        )
        try:
            return await proc.wait()
        except BaseException:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)  # it writes what it has, as a stopped run does
            await asyncio.shield(proc.wait())
            raise


def _ending(grid: Grid, point: Point, code: int) -> str:
    if code in FINISHED:
        summary = json.loads((grid.results_dir(point) / "summary.json").read_text())
        return f"{summary.get('headline', '')}; {summary.get('verdict', '')}"
    lines = (
        (grid.results_dir(point) / "console.txt").read_text(encoding="utf-8", errors="replace").splitlines()
    )
    error = next((line for line in reversed(lines) if line.startswith("error:")), f"exit code {code}")
    if code == 2:  # bad input: every run would refuse it alike
        raise UserError(f"run {point.id}: {error.removeprefix('error: ')}")
    return f"failed ({error}; {grid.results_dir(point) / 'console.txt'})"


def _test_chosen(grid: Grid, run_id: str) -> dict[str, Any]:
    """The chosen run on the test rows against its base model: its one reported number."""
    say(f"sweep: the chosen run {run_id} on the {len(read_jsonl(grid.data / 'test.jsonl'))} test rows, once")
    point_dir = grid.folder / "runs" / run_id
    record = evaluate.evaluate(
        [
            f"run_name={run_id}",
            f"results_dir={point_dir}",
            "against=base",
            f"eval_dataset={(grid.data / 'test.jsonl').resolve()}",
            f"out={grid.folder / 'test'}",
        ]
    )
    trained, base = (m["score"] for m in record["models"])
    return {
        "metric": record["metric"],
        "trained": trained,
        "baseline": base,
        "verdict": record["verdict"],
        "improvement": record["improvement"],
        "rows": record["sizes"],
        "eval": str(grid.folder / "test"),
    }
