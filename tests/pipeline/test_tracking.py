"""W&B tracking tests: real offline runs written by wandb itself, read back; the online path with a fake Api."""

import os
from pathlib import Path

import pytest
import wandb

from posttrain.pipeline import tracking
from posttrain.pipeline.tracking import (
    find_wandb_run_files,
    log_final_metrics,
    read_wandb_records,
    verify_wandb,
    wandb_environment,
    wandb_mode,
)

SECRET = "wb-SECRET-abcdef0123456789"
PROJECT = "posttrain-test"


@pytest.fixture(autouse=True, scope="module")
def _reset_wandb_after_module():
    """wandb keeps a process-wide setup (settings, service); drop it so later test modules start clean."""
    yield
    wandb.teardown()


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """Offline W&B with everything under tmp_path and no way to reach the network."""
    monkeypatch.setenv("WANDB_API_KEY", "placeholder")
    monkeypatch.delenv("WANDB_API_KEY")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb_default"))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb_config"))
    monkeypatch.setenv("WANDB_CACHE_DIR", str(tmp_path / "wandb_cache"))
    monkeypatch.setenv("WANDB_ERROR_REPORTING", "false")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DISABLE_GIT", "true")
    return tmp_path


def _offline_run(log_dir: Path, name: str, rows: list[dict], project: str = PROJECT) -> None:
    run = wandb.init(project=project, name=name, dir=str(log_dir), mode="offline", reinit="create_new")
    for step, row in enumerate(rows):
        run.log(row, step=step)
    run.finish()


def test_wandb_mode(monkeypatch):
    monkeypatch.setenv("WANDB_API_KEY", SECRET)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    assert wandb_mode() == "online"
    for off in ("offline", "disabled", "OFFLINE"):
        monkeypatch.setenv("WANDB_MODE", off)
        assert wandb_mode() == "offline"
    monkeypatch.setenv("WANDB_MODE", "online")
    monkeypatch.setenv("WANDB_API_KEY", "")
    assert wandb_mode() == "offline"


def test_wandb_environment_sets_and_restores(monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "online")
    monkeypatch.delenv("WANDB_RUN_GROUP", raising=False)
    with wandb_environment("offline", group="run_7"):
        assert os.environ["WANDB_MODE"] == "offline" and os.environ["WANDB_RUN_GROUP"] == "run_7"
    assert os.environ["WANDB_MODE"] == "online" and "WANDB_RUN_GROUP" not in os.environ


def test_offline_run_with_metrics_is_verified(offline):
    log_dir = offline / "results" / "logs" / "sft_run"
    _offline_run(
        log_dir, "sft_run", [{"train_mean_nll": 3.0 - 0.2 * i, "learning_rate": 1e-4} for i in range(5)]
    )
    files = find_wandb_run_files(log_dir)
    assert len(files) == 1 and files[0].parent.name.startswith("offline-run-")

    result = verify_wandb(log_dir, PROJECT, "sft_run", "offline", expected_metrics=["train_mean_nll"])
    assert result["verified"] is True, result
    assert result["mode"] == "offline"
    assert set(result["metrics_found"]) == {"train_mean_nll", "learning_rate"}
    assert Path(result["url_or_path"]).is_dir() and Path(result["url_or_path"]).parent == log_dir / "wandb"
    assert "5 history rows" in result["detail"] and "wandb sync" in result["detail"]
    assert set(result) == {"mode", "url_or_path", "verified", "metrics_found", "detail"}


def test_offline_run_without_metrics_is_not_verified(offline):
    log_dir = offline / "logs" / "empty"
    _offline_run(log_dir, "empty", [])
    result = verify_wandb(log_dir, PROJECT, "empty", "offline")
    assert result["verified"] is False
    assert result["metrics_found"] == [] and "no metrics" in result["detail"]


def test_offline_verification_failures(offline):
    log_dir = offline / "logs" / "a"
    _offline_run(log_dir, "a", [{"env/all/reward/total": 0.1}, {"env/all/reward/total": 0.3}])
    missing = verify_wandb(
        log_dir, PROJECT, "a", "offline", expected_metrics=["env/all/reward/total", "test/nll"]
    )
    assert missing["verified"] is False and "test/nll" in missing["detail"]
    wrong_name = verify_wandb(log_dir, PROJECT, "b", "offline")
    assert wrong_name["verified"] is False and "'b'" in wrong_name["detail"]
    wrong_project = verify_wandb(log_dir, "other-project", "a", "offline")
    assert wrong_project["verified"] is False
    nothing = verify_wandb(offline / "does-not-exist", PROJECT, "a", "offline")
    assert nothing["verified"] is False and "no W&B run files" in nothing["detail"]


def test_wandb_core_reader_reads_a_file_spanning_several_blocks(offline):
    """wandb's own reader decodes every history row and the run record of a file of several 32 KiB blocks."""
    log_dir = offline / "logs" / "big"
    rows = [{f"metric_{k:02d}/value": step * 0.001 + k for k in range(25)} for step in range(250)]
    _offline_run(log_dir, "big", rows)
    (wandb_file,) = find_wandb_run_files(log_dir)
    assert wandb_file.stat().st_size > 3 * 32768

    records, reader = read_wandb_records(wandb_file)
    assert reader == "wandb-core leet inspect"
    history = [r["history"] for r in records if r["type"] == "history"]
    assert len(history) == 250
    assert history[-1]["item"]["metric_24/value"] == pytest.approx(249 * 0.001 + 24)
    run = next(r["run"] for r in records if r["type"] == "run")
    assert run["display_name"] == "big" and run["project"] == PROJECT


def test_verification_without_wandb_core_says_why(offline, monkeypatch):
    log_dir = offline / "logs" / "fb"
    _offline_run(log_dir, "fb", [{"train_mean_nll": 2.0}])

    def no_core(_file):
        raise FileNotFoundError("wandb-core missing")

    monkeypatch.setattr(tracking, "_read_with_wandb_core", no_core)
    result = verify_wandb(log_dir, PROJECT, "fb", "offline", expected_metrics=["train_mean_nll"])
    assert result["verified"] is False and "wandb-core missing" in result["detail"]


def test_cookbook_logger_writes_where_verification_looks(offline):
    """The cookbook's own setup_logging(wandb_project=...) run, offline, lands under log_path and verifies."""
    from tinker_cookbook.utils import ml_log

    log_dir = offline / "results" / "logs" / "cookbook_run"
    with wandb_environment("offline", group="cookbook_run"):
        logger = ml_log.setup_logging(
            str(log_dir), wandb_project=PROJECT, wandb_name="cookbook_run", do_configure_logging_module=False
        )
        for step in range(3):
            logger.log_metrics({"train_mean_nll": 2.5 - 0.1 * step}, step=step)
        logger.close()
    assert (log_dir / "metrics.jsonl").is_file()
    result = verify_wandb(log_dir, PROJECT, "cookbook_run", "offline", expected_metrics=["train_mean_nll"])
    assert result["verified"] is True, result
    assert str(log_dir / "wandb" / "offline-run-") in result["url_or_path"]


def test_log_final_metrics_offline(offline):
    wandb_dir = offline / "results" / "logs" / "r1"
    out = log_final_metrics(
        PROJECT,
        "r1",
        {"eval/baseline_nll": 2.8, "eval/trained_nll": 1.9, "verdict": "improved"},
        wandb_dir=wandb_dir,
    )
    assert out["mode"] == "offline" and out["name"] == "r1-eval" and Path(out["url_or_path"]).is_dir()
    result = verify_wandb(wandb_dir, PROJECT, "r1-eval", "offline", expected_metrics=["eval/trained_nll"])
    assert result["verified"] is True
    assert set(result["metrics_found"]) == {"eval/baseline_nll", "eval/trained_nll"}


# ----------------------------------------------------------------------------------------------- online


class _FakeRun:
    def __init__(self, rows, run_id="abc123", url="https://wandb.ai/me/proj/runs/abc123"):
        self.rows, self.id, self.url = rows, run_id, url

    def history(self, samples=500, pandas=True, **_):
        assert pandas is False
        return list(self.rows)


class _FakeApi:
    instances: list["_FakeApi"] = []
    runs_by_path: dict = {}
    error: Exception | None = None

    def __init__(self, *args, **kwargs):
        self.paths: list[str] = []
        _FakeApi.instances.append(self)

    def run(self, path):
        self.paths.append(path)
        if _FakeApi.error:
            raise _FakeApi.error
        return _FakeApi.runs_by_path[path]

    def runs(self, path, filters=None, order=None, per_page=50):
        self.paths.append(path)
        return [
            r for r in _FakeApi.runs_by_path.values() if filters and filters.get("display_name") == "named"
        ]


@pytest.fixture
def fake_api(monkeypatch):
    _FakeApi.instances, _FakeApi.runs_by_path, _FakeApi.error = [], {}, None
    monkeypatch.setattr(wandb, "Api", _FakeApi)
    monkeypatch.setenv("WANDB_API_KEY", SECRET)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_ENTITY", raising=False)
    return _FakeApi


def test_online_verified_by_url(fake_api):
    rows = [{"_step": 0, "train_mean_nll": 2.0, "_runtime": 1.0}, {"_step": 1, "train_mean_nll": 1.5}]
    fake_api.runs_by_path["me/proj/abc123"] = _FakeRun(rows)
    result = verify_wandb(
        None,
        "proj",
        "r",
        "online",
        expected_metrics=["train_mean_nll"],
        url="https://wandb.ai/me/proj/runs/abc123",
    )
    assert result == {
        "mode": "online",
        "url_or_path": "https://wandb.ai/me/proj/runs/abc123",
        "verified": True,
        "metrics_found": ["train_mean_nll"],
        "detail": "W&B run abc123: 2 history rows with 1 metrics",
    }
    assert fake_api.instances[-1].paths == ["me/proj/abc123"]


def test_online_located_by_local_run_files(fake_api, offline, monkeypatch):
    log_dir = offline / "logs" / "loc"
    # same on-disk layout as an online run (just a different dir prefix)
    _offline_run(log_dir, "loc", [{"x": 1.0}])
    (wandb_file,) = find_wandb_run_files(log_dir)
    run_id = wandb_file.stem.removeprefix("run-")
    monkeypatch.setenv("WANDB_ENTITY", "team")
    fake_api.runs_by_path[f"team/{PROJECT}/{run_id}"] = _FakeRun([{"x": 1.0}], run_id=run_id)
    result = verify_wandb(log_dir, PROJECT, "loc", "online")
    assert result["verified"] is True and fake_api.instances[-1].paths == [f"team/{PROJECT}/{run_id}"]


def test_online_by_display_name_and_empty_history(fake_api):
    fake_api.runs_by_path["x"] = _FakeRun([])
    result = verify_wandb(None, "proj", "named", "online")
    assert result["verified"] is False and "no metrics" in result["detail"]
    result = verify_wandb(None, "proj", "unknown", "online")
    assert result["verified"] is False and "no W&B run named 'unknown'" in result["detail"]


def test_online_errors_are_reported_without_secrets(fake_api):
    fake_api.error = RuntimeError(f"401 unauthorized for key {SECRET}")
    result = verify_wandb(None, "proj", "r", "online", url="https://wandb.ai/me/proj/runs/abc123")
    assert result["verified"] is False
    assert SECRET not in repr(result) and "***" in result["detail"]


def test_corrupt_run_file_is_a_failed_verification(offline):
    run_dir = offline / "logs" / "bad" / "wandb" / "offline-run-20250101_000000-zzzz"
    run_dir.mkdir(parents=True)
    (run_dir / "run-zzzz.wandb").write_bytes(b"not a wandb file at all")
    result = verify_wandb(offline / "logs" / "bad", PROJECT, "bad", "offline")
    assert result["verified"] is False and result["detail"]
    with pytest.raises(ValueError, match="mode"):
        verify_wandb(offline, PROJECT, "bad", "sideways")


def test_two_runs_in_one_process_each_write_their_own_verified_wandb_runs(
    tmp_path: Path, engine, tiny_model: str
):
    """From Python, one run after another in other directories: wandb's service resolves a relative run directory
    in its own working directory, so each run ends the service it started (`tracking.end_service`)."""
    import json

    from runs import train_here, write_jsonl

    data = write_jsonl(
        tmp_path / "d.jsonl", [{"prompt": f"Say {i}.", "completion": f"N {i}."} for i in range(40)]
    )
    for name in ("first", "second"):
        (tmp_path / name).mkdir()
        proc = train_here(
            [
                f"dataset={data}",
                f"model_name={tiny_model}",
                "renderer_name=role_colon",
                f"base_url={engine.url}",
                "max_steps=1",
                "batch_size=4",
                "lora_rank=4",
                "save_every=0",
                "eval_every=0",
                f"run_name={name}",
            ],
            tmp_path / name,
        )
        summary = json.loads((tmp_path / name / "results" / "summary.json").read_text())
        assert summary["wandb_verification"]["verified"], (proc.stderr[-2000:], summary["wandb_verification"])
        files = find_wandb_run_files(tmp_path / name / "results" / "logs" / name)
        assert len(files) == 2  # the training loop's run and the evaluation summary's


def test_a_wandb_run_left_open_by_a_run_that_stopped_is_finished_and_a_callers_own_is_kept(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """A loop that stopped part-way leaves its W&B run open; the next run in this process would get it back from
    its own `wandb.init` and clash with its config. `own_service` finishes it (failed); a run the caller opened
    before is not the run's to finish."""
    import wandb

    from posttrain.pipeline.tracking import own_service

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(RuntimeError, match="stopped"), own_service():
        wandb.init(project=PROJECT, name="stopped", dir=str(tmp_path))
        raise RuntimeError("stopped part-way")
    assert wandb.run is None
    mine = wandb.init(project=PROJECT, name="the caller's", dir=str(tmp_path))
    try:
        with own_service():
            pass
        assert wandb.run is mine
    finally:
        mine.finish()
