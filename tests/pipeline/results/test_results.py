import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from posttrain import util
from posttrain.errors import ConfigError
from posttrain.pipeline.results import (
    RL_KEYS,
    SFT_KEYS,
    Outcome,
    ResultsDir,
    RLExample,
    RunFacts,
    SFTExample,
    build_summary,
    compare_examples,
    compute_improvement,
    headline,
    validate_rows,
    validate_summary,
    write_report,
    write_summary,
)
from posttrain.pipeline.results import report as report_mod
from posttrain.pipeline.results.rows import mean_metric
from posttrain.pipeline.settings import TrainConfig, config_to_dict
from posttrain.util import read_jsonl

KIND = {"sft": "nll", "rl": "score"}
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _summary(task_type="sft", baseline=2.8, trained=1.9, **overrides):
    facts = dict(
        method=task_type,
        run_name="run_001",
        tinker_run_id="tinker-run-123",
        log_path="results/logs/run_001",
        wandb_url="https://wandb.ai/me/proj/runs/abc123",
        model="HuggingFaceTB/SmolLM2-135M-Instruct",
        backend="local",
        renderer="qwen3_instruct",
        renderer_source="fallback: ChatML",
        hyperparameters=config_to_dict(TrainConfig()),
        durations={"train": 12.5, "eval": 3.0},
    )
    verification = overrides.pop("wandb_verification", {"mode": "offline", "verified": True, "detail": "ok"})
    facts.update(overrides)
    base_rows, trained_rows = _rows(KIND[task_type], baseline, trained)
    outcome = Outcome(
        kind=KIND[task_type],
        base_rows=base_rows,
        trained_rows=trained_rows,
        baseline=baseline,
        trained=trained,
        dataset={"name": "embedded", "split": "train"},
        sizes={"train_rows": 100, "eval_rows": 10},
    )
    return build_summary(RunFacts(**facts), outcome, verification)


def _rows(kind: str, baseline: float, trained: float, n: int = 20) -> tuple[list, list]:
    """n paired rows whose means are `baseline` and `trained` (NLL: with a spread of +-0.1; scores: the first
    round(n * score) examples right)."""
    if kind == "nll":
        offsets = [0.1 * ((i % 5) - 2) for i in range(n)]
        return [SFTExample(i, "p", "c", baseline + o) for i, o in enumerate(offsets)], [
            SFTExample(i, "p", "c", trained + o) for i, o in enumerate(offsets)
        ]
    right = lambda score, i: i < round(n * score)  # noqa: E731
    return [RLExample(i, "q", "1", "1", "1", right(baseline, i)) for i in range(n)], [
        RLExample(i, "q", "1", "1", "1", right(trained, i)) for i in range(n)
    ]


# ------------------------------------------------------------------------------------------------- rows


def test_row_dataclasses_have_exactly_the_spec_keys():
    rl = RLExample(0, "q", "42", "... 42", "42", True).to_dict()
    sft = SFTExample(0, "p", "c", 2.34).to_dict()
    assert tuple(rl) == RL_KEYS and tuple(sft) == SFT_KEYS
    failed = SFTExample(1, "p", "c", None, error="timeout").to_dict()
    assert failed["error"] == "timeout" and failed["nll"] is None
    validate_rows([rl, RLExample(1, "q", "1", "", None, None, error="sampling failed")], "score")
    validate_rows([sft, failed], "nll")


@pytest.mark.parametrize(
    "rows, task, fragment",
    [
        ([{"index": 0, "prompt": "p", "completion": "c"}], "nll", "missing ['nll']"),
        (
            [{"index": 0, "prompt": "p", "completion": "c", "nll": 1.0, "extra": 1}],
            "nll",
            "unexpected ['extra']",
        ),
        ([{"index": 0, "prompt": "p", "completion": "c", "nll": -1.0}], "nll", "nll must be"),
        ([{"index": 0, "prompt": "p", "completion": "c", "nll": None}], "nll", "null only with an error"),
        ([SFTExample(0, "p", "c", 1.0), SFTExample(0, "p", "c", 1.0)], "nll", "unique"),
        ([RLExample(0, "q", "1", "c", "1", None)], "score", "correct must be"),
        ([RLExample(0, "q", 1, "c", "1", True)], "score", "ground_truth must be a string"),
    ],
)
def test_validate_rows_rejects_bad_rows(rows, task, fragment):
    with pytest.raises(ValueError) as exc:
        validate_rows(rows, task)
    assert fragment in str(exc.value)


def test_mean_metric_skips_failed_examples():
    rows = [
        SFTExample(0, "p", "c", 2.0),
        SFTExample(1, "p", "c", 4.0),
        SFTExample(2, "p", "c", None, error="x"),
    ]
    assert mean_metric(rows, "nll") == pytest.approx(3.0)
    rl = [RLExample(i, "q", "1", "c", "1", i < 3) for i in range(4)]
    assert mean_metric(rl, "score") == pytest.approx(0.75)


# ------------------------------------------------------------------------------------------ results dir


def test_write_jsonl_roundtrip_and_no_temp_files(tmp_path):
    rd = ResultsDir(tmp_path / "results")
    rd.prepare()
    rows = [SFTExample(i, f"prompt {i} ünïcode", "c", 1.5 + i) for i in range(3)]
    path = rd.write_jsonl("base_model.jsonl", rows)
    assert read_jsonl(path) == [r.to_dict() for r in rows]
    rd.write_json("summary.json", {"a": float("nan"), "b": 1})
    assert json.loads((rd.path / "summary.json").read_text()) == {"a": None, "b": 1}
    assert sorted(p.name for p in rd.path.iterdir()) == ["base_model.jsonl", "summary.json"]
    assert rd.log_dir("run_9") == rd.path / "logs" / "run_9"


def test_atomic_write_keeps_old_content_when_replace_fails(tmp_path, monkeypatch):
    rd = ResultsDir(tmp_path)
    rd.write_text("report.md", "old report\n")

    def boom(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(util.os, "replace", boom)
    with pytest.raises(OSError, match="disk full"):
        rd.write_text("report.md", "new report\n")
    monkeypatch.undo()
    assert (tmp_path / "report.md").read_text() == "old report\n"
    assert [p.name for p in tmp_path.iterdir()] == ["report.md"]  # temp file cleaned up


def test_writes_are_redacted(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_API_KEY", "wb-very-secret-key-123")
    rd = ResultsDir(tmp_path)
    rd.write_jsonl("x.jsonl", [{"index": 0, "error": "auth failed with wb-very-secret-key-123"}])
    text = (tmp_path / "x.jsonl").read_text()
    assert "wb-very-secret-key-123" not in text and "***" in text


def test_prepare_moves_previous_run_without_deleting(tmp_path, capsys):
    rd = ResultsDir(tmp_path / "results")
    rd.prepare()
    rd.write_json("summary.json", {"run_name": "old_run", "x": 1})
    rd.write_jsonl("base_model.jsonl", [{"index": 0}])
    rd.write_text("report.md", "old")
    old_logs = rd.log_dir("old_run")
    old_logs.mkdir(parents=True)
    (old_logs / "metrics.jsonl").write_text("{}\n")

    dest = rd.prepare()
    assert dest == rd.path / "previous" / "old_run"
    assert json.loads((dest / "summary.json").read_text())["x"] == 1
    assert (dest / "base_model.jsonl").exists() and (dest / "report.md").read_text() == "old"
    assert not (rd.path / "summary.json").exists() and not (rd.path / "base_model.jsonl").exists()
    assert (old_logs / "metrics.jsonl").exists()  # other runs' logs stay where their summary points
    assert "previous/old_run" in capsys.readouterr().out

    # Same run name again: never overwrite the first copy.
    rd.write_json("summary.json", {"run_name": "old_run", "x": 2})
    dest2 = rd.prepare()
    assert dest2 == rd.path / "previous" / "old_run-2"
    assert json.loads((dest / "summary.json").read_text())["x"] == 1
    assert json.loads((dest2 / "summary.json").read_text())["x"] == 2

    assert rd.prepare() is None  # nothing left to move


def test_prepare_without_summary_uses_timestamp_and_moves_same_named_logs(tmp_path):
    rd = ResultsDir(tmp_path)
    (tmp_path / "trained_model.jsonl").write_text('{"index": 0}\n')
    logs = rd.log_dir("again")
    logs.mkdir(parents=True)
    (logs / "checkpoints.jsonl").write_text("{}\n")
    dest = rd.prepare(run_name="again")
    assert dest.parent == tmp_path / "previous" and dest.name.startswith("run-")
    assert (dest / "trained_model.jsonl").exists()
    assert (dest / "logs" / "again" / "checkpoints.jsonl").exists()
    assert not logs.exists()


# --------------------------------------------------------------------------------------------- summary


def test_build_and_validate_summary_sft(tmp_path):
    s = _summary()
    validate_summary(s)
    assert (
        s["task_type"] == "sft"
        and s["method"] == "sft"
        and s["baseline_nll"] == 2.8
        and s["trained_nll"] == 1.9
    )
    assert s["verdict"] == "improved"
    assert s["improvement"]["absolute"] == pytest.approx(0.9)
    assert s["improvement"]["relative"] == pytest.approx(0.9 / 2.8)
    assert set(s["versions"]) >= {"posttrain", "tinker", "tinker_cookbook", "torch", "python"}
    assert s["versions"]["tinker"] == "0.38.0" and s["versions"]["tinker_cookbook"] == "0.6.1"
    assert s["hyperparameters"]["batch_size"] == 32
    path = write_summary(ResultsDir(tmp_path), s)
    validate_summary(json.loads(path.read_text()))


def test_build_summary_rl_not_improved():
    s = _summary("rl", baseline=0.5, trained=0.5)
    validate_summary(s)
    assert s["baseline_score"] == 0.5 and "baseline_nll" not in s
    assert s["verdict"] == "not improved"


@pytest.mark.parametrize(
    "mutate, fragment",
    [
        (lambda s: s.pop("task_type"), "task_type"),
        (lambda s: s.update(task_type="pretraining"), "task_type"),
        (lambda s: s.update(task_type="dpo"), "task_type"),  # the user guide's task types are rl and sft
        (lambda s: s.pop("method"), "method"),
        (lambda s: s.pop("tinker_run_id"), "tinker_run_id"),
        (lambda s: s.update(log_path=""), "log_path"),
        (lambda s: s.pop("wandb_url"), "wandb_url"),
        (lambda s: s.pop("trained_nll"), "trained_nll"),
        (lambda s: s.update(baseline_nll="2.8"), "baseline_nll"),
        (lambda s: s.update(baseline_nll=True), "baseline_nll"),
        (lambda s: s.update(trained_nll=float("nan")), "trained_nll"),
        (lambda s: s.update(verdict="better"), "verdict"),
        (lambda s: s.update(hyperparameters=None), "hyperparameters"),
    ],
)
def test_validate_summary_failures(mutate, fragment):
    s = _summary()
    mutate(s)
    with pytest.raises(ValueError) as exc:
        validate_summary(s)
    assert fragment in str(exc.value)


def test_validate_summary_rl_requires_scores_in_range():
    s = _summary("rl", baseline=0.4, trained=0.6)
    s["trained_score"] = 67  # percent instead of fraction
    with pytest.raises(ValueError, match="trained_score"):
        validate_summary(s)
    s = _summary("rl", baseline=0.4, trained=0.6)
    del s["baseline_score"]
    with pytest.raises(ValueError, match="baseline_score"):
        validate_summary(s)


def test_headlines():
    assert headline(_summary()) == "Base NLL: 2.80 → Trained NLL: 1.90 (32.1% reduction)"
    assert headline(_summary("rl", 0.42, 0.67)) == "Base accuracy: 42.0% → Trained: 67.0% (+25.0 points)"
    assert headline(_summary(baseline=2.0, trained=2.1)).endswith("(5.0% increase)")
    imp = compute_improvement("score", 0.4, 0.6)
    assert imp["points"] == pytest.approx(20.0) and imp["relative"] == pytest.approx(0.5)


# ------------------------------------------------------------------------------------------ comparison


def test_compare_examples_sft_counts_with_tolerance():
    base = [SFTExample(i, f"p{i}", "c", 2.0) for i in range(6)]
    trained = [
        SFTExample(0, "p0", "c", 1.0),  # improved
        SFTExample(1, "p1", "c", 1.5),  # improved
        SFTExample(2, "p2", "c", 2.0005),  # within 1e-3 relative: unchanged
        SFTExample(3, "p3", "c", 2.5),  # regressed
        SFTExample(4, "p4", "c", None, error="failed"),  # error
        SFTExample(7, "p7", "c", 1.0),  # unpaired
    ]
    c = compare_examples(base, trained, "nll")
    assert (c["paired"], c["improved"], c["regressed"], c["unchanged"], c["errors"]) == (5, 2, 1, 1, 1)
    assert c["unpaired_base"] == [5] and c["unpaired_trained"] == [7]
    assert [e["index"] for e in c["top_improved"]] == [0, 1]
    assert c["top_regressed"][0]["index"] == 3
    assert c["base_mean"] == pytest.approx(2.0) and c["trained_mean"] == pytest.approx(
        (1 + 1.5 + 2.0005 + 2.5) / 4
    )


def test_compare_examples_rl_flips():
    base = [
        RLExample(i, f"q{i}", str(i), "c", "x", ok) for i, ok in enumerate([False, False, True, True, False])
    ]
    trained = [
        RLExample(i, f"q{i}", str(i), "c", str(i), ok)
        for i, ok in enumerate([True, False, True, False, True])
    ]
    c = compare_examples(trained_rows=trained, base_rows=base, kind="score")
    assert (c["improved"], c["regressed"], c["unchanged"]) == (2, 1, 2)
    assert {e["index"] for e in c["top_improved"]} == {0, 4}
    assert c["top_regressed"][0]["trained_answer"] == "3"
    assert c["base_mean"] == pytest.approx(0.4) and c["trained_mean"] == pytest.approx(0.6)


def test_compare_examples_partial_credit_moves_before_correct_flips():
    # A rubric's judged score (or code's fraction of tests) can rise while every `correct` flag stays as it was.
    def rows(rewards: list[float]) -> list[dict]:
        return [
            {**RLExample(i, f"q{i}", "", "c", "", True).to_dict(), "reward": r} for i, r in enumerate(rewards)
        ]

    c = compare_examples(rows([0.70, 0.70, 0.80, 0.75]), rows([0.75, 0.705, 0.60, 0.75]), "score")
    assert (c["improved"], c["regressed"], c["unchanged"]) == (1, 1, 2)
    assert c["top_improved"][0]["base_reward"] == 0.70 and c["top_improved"][0]["trained_reward"] == 0.75
    assert c["top_regressed"][0]["delta"] == pytest.approx(-0.2)


# ---------------------------------------------------------------------------------------------- report


def _cookbook_metrics(log_dir, rl=False):
    """metrics.jsonl written by the cookbook's own JsonLogger, as the training loops do."""
    from tinker_cookbook.utils.ml_log import JsonLogger

    logger = JsonLogger(log_dir)
    for step in range(12):
        m = {"progress": step / 12, "learning_rate": 1e-4}
        if rl:
            m.update({"env/all/reward/total": 0.2 + 0.04 * step, "by_group/frac_mixed": 0.5})
            if step % 5 == 0:
                m["test/env/all/reward/total"] = 0.25 + 0.03 * step
        else:
            m["train_mean_nll"] = 3.0 - 0.08 * step
            if step % 5 == 0:
                m["test/nll"] = 2.9 - 0.07 * step
        logger.log_metrics(m, step=step)
    return log_dir / "metrics.jsonl"


def test_write_report_sft(tmp_path):
    rd = ResultsDir(tmp_path / "results")
    rd.prepare()
    metrics = _cookbook_metrics(rd.log_dir("run_001"))
    base = [SFTExample(i, f"prompt number {i}", "c", 2.8) for i in range(5)]
    trained = [SFTExample(i, f"prompt number {i}", "c", 1.9 if i else 3.0) for i in range(5)]
    comparison = compare_examples(base, trained, "nll")
    warning = write_report(rd, _summary(), comparison, metrics)
    assert warning is None
    report = (rd.path / "report.md").read_text()
    assert "Base NLL: 2.80 → Trained NLL: 1.90 (32.1% reduction)" in report
    assert "improved **4**, regressed **1**, unchanged 0" in report
    assert "prompt number 1" in report and "| lora_rank | 32 |" in report
    assert "training_curves.png" in report
    png = (rd.path / "training_curves.png").read_bytes()
    assert png.startswith(PNG_MAGIC) and len(png) > 5000
    assert report_mod._series(report_mod.load_metrics(metrics))[1].keys() == {"test/nll"}


def test_write_report_rl_not_improved_warns_loudly(tmp_path):
    rd = ResultsDir(tmp_path)
    metrics = _cookbook_metrics(tmp_path / "logs" / "r", rl=True)
    summary = _summary("rl", baseline=0.5, trained=0.4)
    base = [RLExample(i, "q", "1", "c", "1", i < 5) for i in range(10)]
    trained = [RLExample(i, "q", "1", "c", "1", i < 4) for i in range(10)]
    warning = write_report(rd, summary, compare_examples(base, trained, "score"), metrics)
    assert warning and "did NOT improve" in warning
    for topic in ("learning rate", "steps", "reward signal", "constant-reward", "data quality"):
        assert topic in warning
    report = (tmp_path / "report.md").read_text()
    assert "Base accuracy: 50.0% → Trained: 40.0% (-10.0 points)" in report
    assert "did NOT improve" in report
    assert (tmp_path / "training_curves.png").read_bytes().startswith(PNG_MAGIC)


def test_write_report_without_metrics_still_plots_scores(tmp_path):
    warning = write_report(tmp_path, _summary(), compare_examples([], [], "nll"), None)
    assert warning is None
    assert (tmp_path / "training_curves.png").read_bytes().startswith(PNG_MAGIC)
    assert "no metrics.jsonl" in (tmp_path / "report.md").read_text()
    assert oct(os.stat(tmp_path / "report.md").st_mode & 0o777) == "0o644"


def test_empty_wandb_url_only_allowed_with_a_failed_verification():
    s = _summary(wandb_url="", wandb_verification={"mode": "online", "verified": False, "detail": "401"})
    validate_summary(s)
    s = _summary(wandb_url="", wandb_verification={"mode": "online", "verified": True, "detail": "ok"})
    with pytest.raises(ValueError, match="wandb_url"):
        validate_summary(s)


HOLD = """
import sys, time
from posttrain.pipeline.results import ResultsDir
with ResultsDir(sys.argv[1]).single_writer("first"):
    print("holding", flush=True)
    time.sleep(600)
"""


def test_one_run_at_a_time_writes_into_a_results_folder(tmp_path: Path) -> None:
    folder = ResultsDir(tmp_path / "results")
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(folder.path)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "holding\n"
        with pytest.raises(
            ConfigError, match=rf"results: run first \(process {holder.pid}, started .*\) is writing"
        ):
            with folder.single_writer("second"):
                pass
        # A run killed outright holds nothing: the next takes the folder over and is told whose run died.
        holder.kill()
        holder.wait()
        with folder.single_writer("second") as died:
            assert died is not None and died.startswith(f"run first (process {holder.pid}")
    finally:
        holder.kill()
    # A run that ended (here: by an exception) leaves the folder free and names nobody.
    with pytest.raises(RuntimeError), folder.single_writer("third"):
        raise RuntimeError("stopped")
    with folder.single_writer("fourth") as died:
        assert died is None
        with pytest.raises(ConfigError, match=r"run fourth \(process"):
            with ResultsDir(folder.path).single_writer("fifth"):
                pass


def test_a_run_that_ends_removes_its_lock_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = ResultsDir(tmp_path / "results")
    lock = folder.path / ".writer"
    with folder.single_writer("first"):
        assert lock.read_text().startswith(f"run first (process {os.getpid()}, started ")
    assert not lock.exists() and sorted(folder.path.iterdir()) == []
    with pytest.raises(RuntimeError), folder.single_writer("second"):
        raise RuntimeError("stopped")
    assert not lock.exists()
    # The run holding the folder ends, removing its lock file, just after this one opened it: holding that file
    # would hold nothing, so this run takes the folder's current one.
    real_open, opened = os.open, []

    def open_as_the_holder_ends(path, *args, **kwargs):
        fd = real_open(path, *args, **kwargs)
        if Path(path) == lock:
            if not opened:
                lock.unlink()
            opened.append(fd)
        return fd

    monkeypatch.setattr(os, "open", open_as_the_holder_ends)
    with folder.single_writer("third") as died:
        assert died is None and len(opened) == 2
        assert os.fstat(opened[1]).st_ino == lock.stat().st_ino and lock.read_text().startswith("run third")
    assert not lock.exists()
