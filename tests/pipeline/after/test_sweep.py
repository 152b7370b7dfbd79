"""`posttrain sweep`: the grid from one command, stopped and continued, chosen on validation rows that are neither
trained on nor the test rows, reported once on the test rows; and bad input refused in one line before anything runs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from runs import cli_here, read_jsonl, write_jsonl

from posttrain.pipeline.after.sweep_grid import GRID_LIMIT, parse_grid


def _pairs(n: int) -> list[dict]:
    return [{"prompt": f"Say the number {i}.", "completion": f"Number {i}. Done."} for i in range(n)]


def _prompts(path: Path) -> set[str]:
    return {row["messages"][0]["content"] for row in read_jsonl(path)}


def test_a_sweep_stops_continues_and_chooses_on_validation_rows_apart_from_the_test_rows(
    tmp_path: Path, tiny_model: str
) -> None:
    data = write_jsonl(tmp_path / "pairs.jsonl", _pairs(48))
    argv = [
        sys.executable,
        "-m",
        "posttrain.cli.main",
        "sweep",
        "learning_rate=1e-3,3e-2",
        f"dataset={data}",
        f"model_name={tiny_model}",
        "renderer_name=role_colon",
        "batch_size=4",
        "max_steps=6",
        "save_every=0",
        "eval_every=0",
        "backend=local",
        "lora_rank=8",
        "dtype=fp32",
        "guard=false",
        "name=lr",
    ]
    env = {
        **os.environ,
        "WANDB_MODE": "offline",
        "HF_HUB_OFFLINE": "1",
        "POSTTRAIN_CACHE": str(tmp_path / "cache"),
    }
    first = subprocess.Popen(
        argv, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    assert first.stdout is not None
    lines = []
    for line in first.stdout:  # stopped once its first run has finished
        lines.append(line)
        if line.startswith("sweep: 1/2 "):
            time.sleep(2)  # the second run is under way
            first.send_signal(signal.SIGTERM)
    first.wait(timeout=120)
    output = "".join(lines)
    assert first.returncode == 130, output
    assert "sweep plan: about" in output and "the same command continues it" in output

    again = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode in (0, 1, 3), again.stdout[-3000:] + again.stderr[-3000:]
    assert "sweep: 1 of 2 runs completed before (kept)" in again.stdout and "sweep plan" not in again.stdout

    folder = tmp_path / "sweeps" / "lr"
    record = json.loads((folder / "sweep.json").read_text())
    train, validation, test = (
        _prompts(folder / "data" / f"{p}.jsonl") for p in ("train", "validation", "test")
    )
    assert train and validation and test
    assert not (train & validation or train & test or validation & test)
    assert len(train | validation | test) == 48
    by_lr = {p["values"]["learning_rate"]: p for p in record["points"]}
    assert {p["status"] for p in record["points"]} == {"completed"}
    for point in record["points"]:
        summary = json.loads((folder / "runs" / point["id"] / "summary.json").read_text())
        rows = read_jsonl(folder / "runs" / point["id"] / "trained_model.jsonl")
        assert {row["prompt"].removeprefix("user: ") for row in rows} == validation
        assert len(rows) == len(validation) and summary["trained_nll"] == point["trained"]
    best = min(by_lr, key=lambda lr: by_lr[lr]["trained"])
    chosen = record["chosen"]
    assert chosen["setting"] == {"learning_rate": best} and chosen["run"] == by_lr[best]["id"]
    evaluated = json.loads((folder / "test" / "eval.json").read_text())
    test_rows = read_jsonl(folder / "test" / "model.jsonl")
    assert len(test_rows) == len(test) and evaluated["models"][0]["checkpoint"].startswith("tinker://")
    assert (
        chosen["test"]["trained"] == evaluated["models"][0]["score"]
        and chosen["test"]["verdict"] == evaluated["verdict"]
    )
    assert (folder / "sweep.png").stat().st_size > 1000
    table = (folder / "sweep.md").read_text()
    assert "| learning_rate | base | trained |" in table and f"Chosen: learning_rate={best}" in table


def test_seeds_make_an_axis_and_every_point_its_own_run(tmp_path: Path) -> None:
    settings, grid = parse_grid(
        [
            "learning_rate=1e-4,3e-4",
            "lr_schedule=linear,cosine",
            "seeds=2",
            "seed=5",
            "env=reasoning_gym:basic_arithmetic:min_terms=2,max_terms=2",
            "dataset=x.jsonl",
            f"out={tmp_path}",
        ]
    )
    assert grid.axes == {
        "learning_rate": ["1e-4", "3e-4"],
        "lr_schedule": ["linear", "cosine"],
        "seed": ["5", "6"],
    }
    # free text keeps its commas
    assert "env=reasoning_gym:basic_arithmetic:min_terms=2,max_terms=2" in grid.shared
    assert len(grid.points) == 8 and len({p.id for p in grid.points}) == 8
    assert grid.points[0].argv() == ["learning_rate=1e-4", "lr_schedule=linear", "seed=5"]
    assert {p.setting for p in grid.points if p.values[-1] == ("seed", "6")} == {
        p.setting for p in grid.points[::2]
    }
    assert grid.folder.parent == tmp_path and settings.seeds == 2
    # The same settings name the same folder: the same command continues the same sweep.
    same = parse_grid(["learning_rate=1e-4,3e-4", "seeds=2", "lora_rank=8"])[1].folder
    assert same == parse_grid(["lora_rank=8", "seeds=2", "learning_rate=1e-4,3e-4"])[1].folder
    assert same != parse_grid(["lora_rank=16", "seeds=2", "learning_rate=1e-4,3e-4"])[1].folder


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["sweep", "learning_rate=,"], "learning_rate=,: an empty list of values"),
        (["sweep", "learning_rate=1e-4,,3e-4"], "an empty or repeated value in the list"),
        (["sweep", "learning_rat=1e-4,3e-4"], "learning_rat"),
        (["sweep", "learning_rate=1e-4,fast"], "learning_rate"),
        (["sweep", "dataset=x.jsonl"], "nothing to sweep"),
        (["sweep", "seeds=0", "learning_rate=1e-4,3e-4"], "seeds=0: must be at least 1"),
        (["sweep", "seeds=2", "seed=abc", "learning_rate=1e-4,3e-4"], "seed=abc: not an integer"),
        (["sweep", "run_name=a", "learning_rate=1e-4,3e-4"], "run_name= is the sweep's own"),
        (["sweep", "env=arithmetic", "learning_rate=1e-4,3e-4"], "env=arithmetic generates its problems"),
        (
            ["sweep", "learning_rate=1e-5,2e-5,3e-5,4e-5,5e-5", "lora_rank=4,8,16"],
            f"the grid has 15 runs, more than {GRID_LIMIT}; add yes=true",
        ),
    ],
)
def test_bad_sweeps_are_one_line_before_anything_runs(tmp_path: Path, argv: list[str], needle: str) -> None:
    started = time.monotonic()
    proc = cli_here(argv, tmp_path)
    assert proc.returncode == 2 and needle in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr
    assert not (tmp_path / "sweeps").exists() and time.monotonic() - started < 30
