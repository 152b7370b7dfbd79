"""`posttrain cache`: what posttrain keeps on disk, and pruning the local checkpoint store, on a store made here."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
from runs import cli_here, posttrain

from posttrain.cli.cache import parse_duration

DAY = 86400.0


def _run_folder(
    store: Path, run_id: str, days_old: float, checkpoints: dict[str, int], metadata: dict | None = None
):
    """A run folder as the engine writes it: run.json, and per checkpoint `kind/name/` holding meta.json and an
    adapter of `size` bytes; every file last changed `days_old` days ago."""
    folder = store / run_id
    folder.mkdir(parents=True)
    (folder / "run.json").write_text(json.dumps({"base_model": "tiny", "user_metadata": metadata or {}}))
    for checkpoint, size in checkpoints.items():
        directory = folder / checkpoint
        directory.mkdir(parents=True)
        (directory / "meta.json").write_text(json.dumps({"base_model": "tiny", "time": 0}))
        (directory / "adapter.safetensors").write_bytes(b"\0" * size)
    when = time.time() - days_old * DAY
    for path in [folder, *folder.rglob("*")]:
        os.utime(path, (when, when))


@pytest.fixture
def cache(tmp_path: Path) -> Path:
    """A posttrain cache: three runs in its checkpoint store (10 days, 3 days and 14 minutes old) and a converted
    model."""
    store = tmp_path / "cache" / "checkpoints"
    _run_folder(
        store,
        "sold:train:0",
        10,
        {"weights/final": 3_000_000, "sampler_weights/final": 1_000_000},
        {"renderer_name": "role_colon"},
    )
    _run_folder(store, "smid:train:0", 3, {"sampler_weights/000004": 2_000_000})
    _run_folder(store, "snew:train:0", 0.01, {})  # e.g. a run still training, nothing saved yet
    (tmp_path / "cache" / "models" / "m").mkdir(parents=True)
    (tmp_path / "cache" / "models" / "m" / "model.safetensors").write_bytes(b"\0" * 5_000_000)
    return tmp_path / "cache"


def _env(cache: Path) -> dict[str, str]:
    return {"POSTTRAIN_CACHE": str(cache)}


def test_durations_take_s_m_h_d():
    assert [parse_duration(t) for t in ("30s", "90m", "12h", "7d", "1.5d")] == [
        30,
        5400,
        43200,
        604800,
        129600,
    ]


def test_cache_lists_runs_checkpoints_sizes_metadata_and_other_caches_as_a_subprocess(cache, tmp_path):
    proc = posttrain(["cache"], tmp_path, _env(cache))
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    out = proc.stdout
    assert f"checkpoint store: {cache / 'checkpoints'} (3 runs, 6.0 MB)" in out
    # Least recently changed first, each with its checkpoints, size, age and metadata.
    assert out.index("sold:train:0") < out.index("smid:train:0") < out.index("snew:train:0")
    assert "weights/final, sampler_weights/final" in out and "(10d ago)" in out
    assert "metadata renderer_name=role_colon" in out
    assert "(no checkpoints)" in out
    assert f"{cache / 'models'}  5.0 MB" in out
    assert "total: 11.0 MB" in out
    assert cli_here(["cache", "list"], tmp_path, _env(cache)).stdout == out


def test_prune_older_than_removes_old_runs_and_says_what_was_freed(cache, tmp_path):
    store = cache / "checkpoints"
    dry = cli_here(["cache", "prune", "older_than=2d", "dry_run=true"], tmp_path, _env(cache))
    assert dry.returncode == 0, dry.stderr
    assert (
        "would remove sold:train:0 (4.0 MB" in dry.stdout
        and "would remove smid:train:0 (2.0 MB" in dry.stdout
    )
    assert "dry run: would free 6.0 MB (2 runs); nothing was removed" in dry.stdout
    assert len(list(store.iterdir())) == 3

    proc = cli_here(["cache", "prune", "older_than=7d"], tmp_path, _env(cache))
    assert proc.returncode == 0, proc.stderr
    assert (
        "removed sold:train:0 (4.0 MB, changed 10d ago: weights/final, sampler_weights/final)" in proc.stdout
    )
    assert "freed 4.0 MB (1 run); the store holds 2 runs, 2.0 MB" in proc.stdout
    assert sorted(p.name for p in store.iterdir()) == ["smid:train:0", "snew:train:0"]
    again = cli_here(["cache", "prune", "older_than=7d"], tmp_path, _env(cache))
    assert "nothing to remove" in again.stdout


def test_prune_run_removes_that_run_from_the_store_given(cache, tmp_path):
    moved = tmp_path / "elsewhere"
    (cache / "checkpoints").rename(moved)
    proc = cli_here(["cache", "prune", "run=smid:train:0", f"checkpoint_dir={moved}"], tmp_path, _env(cache))
    assert proc.returncode == 0, proc.stderr
    assert "freed 2.0 MB (1 run)" in proc.stdout
    assert sorted(p.name for p in moved.iterdir()) == ["snew:train:0", "sold:train:0"]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["prune", "older_than=7x"], "error: older_than=7x: not a duration: a number with s, m, h or d"),
        (["prune", "older_than=7"], "error: older_than=7: not a duration"),
        (["prune", "run=nope"], "error: run=nope: no such run in "),
        (
            ["prune", "olderthan=7d"],
            "error: olderthan=7d: not a setting of `posttrain cache prune` (it takes",
        ),
        (["prune"], "error: cache prune: give older_than=DURATION (e.g. 7d) or run=RUN_ID, one of them"),
        (["prune", "run=sold:train:0", "older_than=1d"], "error: cache prune: give older_than=DURATION"),
        (["prune", "run=sold:train:0", "dry_run=maybe"], "error: dry_run=maybe: expected true or false"),
        (["list", "older_than=1d"], "error: older_than=1d: not a setting of `posttrain cache list`"),
        (["purge"], "error: cache purge: unknown action"),
    ],
)
def test_bad_input_is_one_line_exit_2_and_removes_nothing(cache, tmp_path, argv: list[str], message: str):
    proc = cli_here(["cache", *argv], tmp_path, _env(cache))
    assert proc.returncode == 2
    assert proc.stderr.startswith(message) and proc.stderr.count("\n") == 1, proc.stderr
    assert len(list((cache / "checkpoints").iterdir())) == 3


def test_help_and_the_command_list_name_it(tmp_path):
    assert "posttrain cache prune older_than=DURATION" in cli_here(["cache", "--help"], tmp_path).stdout
    assert "cache [list|prune]" in cli_here([], tmp_path).stdout
