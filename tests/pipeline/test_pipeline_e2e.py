"""End-to-end runs of `train.py` as a user runs it: a real subprocess, the local engine, real files, W&B offline."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from runs import FINISHED, read_jsonl, train, train_here

from posttrain.config.parse import UNSUPPORTED_SENTENCE
from posttrain.pipeline.results import validate_summary

SECRET_TINKER = "tml-very-secret-tinker-key-123"
_BAR = re.compile(r"\d+%\|")  # a tqdm progress bar's line ("training:  50%|█████     | 3/6 ...")
SECRET_WANDB = "wandb-very-secret-key-456"


@pytest.fixture(scope="module")
def sft_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small single-turn data set in prompt/completion format with a very regular completion style."""
    path = tmp_path_factory.mktemp("data") / "pairs.jsonl"
    rows = [{"prompt": f"Say the number {i}.", "completion": f"Number {i}. Done."} for i in range(60)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_sft_run_writes_complete_results(tmp_path: Path, tiny_model: str, sft_data: Path) -> None:
    (tmp_path / ".env").write_text(f"TINKER_API_KEY={SECRET_TINKER}\nWANDB_API_KEY={SECRET_WANDB}\n")
    proc = train(
        [
            f"dataset={sft_data}",
            f"model_name={tiny_model}",
            "renderer_name=role_colon",
            "learning_rate=0.01",
            "batch_size=8",
            "max_steps=6",
            "eval_every=3",
            "save_every=0",
            "run_name=sft_e2e",
            "backend=local",
            "lora_rank=8",
            "wandb_project=posttrain-tests",
            "guard=true",  # the default guard set, end to end (other tests' runs leave it out: runs.without_guard)
        ],
        tmp_path,
        unset=("TINKER_API_KEY", "WANDB_API_KEY"),  # so both come from the .env file
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = tmp_path / "results"
    summary = json.loads((results / "summary.json").read_text())
    validate_summary(summary)
    assert summary["task_type"] == "sft" and summary["method"] == "sft"
    assert summary["trained_nll"] < summary["baseline_nll"]
    # How long the run took to be ready (engine, tokenizer, the method prepared), beside its phases.
    durations = summary["durations_seconds"]
    assert 0 < durations["setup"] < durations["total"] and {"base_eval", "training", "trained_eval"} <= set(
        durations
    )
    assert summary["log_path"].endswith("results/logs/sft_e2e")
    assert summary["tinker_run_id"] and summary["tinker_run_id"] in summary["checkpoint_path"]
    assert summary["dataset"]["format"] == "prompt_completion"
    assert summary["dataset"]["train_on_what"] == "last_assistant_message"
    assert summary["wandb_verification"]["verified"] is True
    assert summary["hyperparameters"]["learning_rate"] == 0.01
    base, trained = read_jsonl(results / "base_model.jsonl"), read_jsonl(results / "trained_model.jsonl")
    assert len(base) == len(trained) == summary["sizes"]["eval_rows"] > 0
    # Beside each NLL, what the model itself now answers (greedy), for both models.
    assert set(base[0]) == set(trained[0]) == {"index", "prompt", "completion", "nll", "answer"}
    assert all(isinstance(r["answer"], str) for r in base + trained)
    # (the tiny model's greedy answers may be empty; test_report_html checks an answer is shown on the page)
    assert base[0]["completion"].startswith("Number ")
    metrics = read_jsonl(results / "logs" / "sft_e2e" / "metrics.jsonl")
    assert any("test/nll" in m for m in metrics) and any("train_mean_nll" in m for m in metrics)
    assert (results / "report.md").read_text().count("NLL") >= 1
    assert (results / "training_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # The terminal shows phases, progress and the result; library output goes to the run's console.log.
    terminal = proc.stdout + proc.stderr
    # Lines on the terminal besides the progress bars: a bar's redraws ("\r") and the line breaks around the lines
    # said while it is open depend on the machine's speed, so they are not counted (23 lines here).
    said = [line for line in re.split(r"[\r\n]", proc.stdout) if line.strip() and not _BAR.search(line)]
    assert len(said) < 30 and proc.stderr.strip() == "", terminal
    for noise in ("FutureWarning", "Retrying", "wandb:", "Metric", "INFO"):
        assert noise not in terminal, noise
    assert "training:" in proc.stdout and "6/6" in proc.stdout  # the training bar reached step 6 of 6
    console_log = (results / "logs" / "sft_e2e" / "console.log").read_text()
    assert "train_mean_nll" in console_log and "wandb" in console_log
    # Secrets from .env appear nowhere: not in output, results, logs or W&B files.
    for secret in (SECRET_TINKER, SECRET_WANDB):
        assert secret not in proc.stdout + proc.stderr
        for f in results.rglob("*"):
            if f.is_file():
                assert secret.encode() not in f.read_bytes(), f

    # A rerun keeps the first run's results under results/previous/.
    proc2 = train(["dataset=/nonexistent/data.jsonl", "backend=local"], tmp_path)
    assert proc2.returncode == 2 and "Traceback" not in proc2.stderr
    assert "data.jsonl" in proc2.stderr and len(proc2.stderr.strip().splitlines()) == 1
    # bad input lost nothing
    assert json.loads((results / "summary.json").read_text())["run_name"] == "sft_e2e"


def test_a_run_that_regresses_on_its_guard_says_so(tmp_path: Path, tiny_model: str, sft_data: Path) -> None:
    """Built to regress: a learning rate far too high for the tiny model drives it onto the training data's one
    phrasing, so replies made of words the training data never uses (the user's guard set) become much less
    likely than under the untrained model."""
    words = [
        "zephyr",
        "quixotic",
        "labyrinth",
        "obsidian",
        "marmalade",
        "nebula",
        "tundra",
        "falconry",
        "origami",
        "velvet",
        "archipelago",
        "kaleidoscope",
        "sycamore",
        "bagpipe",
        "glacier",
    ]
    guard_file = tmp_path / "everyday.jsonl"
    rows = [
        {
            "messages": [
                {"role": "user", "content": f"Say the number {k}."},
                {"role": "assistant", "content": " ".join(words[(k + j) % len(words)] for j in range(12))},
            ]
        }
        for k in range(30)
    ]
    guard_file.write_text("".join(json.dumps(r) + "\n" for r in rows))
    proc = train(
        [
            f"dataset={sft_data}",
            f"model_name={tiny_model}",
            "renderer_name=role_colon",
            "learning_rate=0.3",
            "batch_size=8",
            "max_steps=6",
            "eval_every=0",
            "save_every=0",
            "run_name=regress",
            "backend=local",
            "lora_rank=8",
            f"guard_dataset={guard_file}",
        ],
        tmp_path,
    )
    results = tmp_path / "results"
    summary = json.loads((results / "summary.json").read_text())
    guard = summary["guard"]
    assert guard["regressed"] == ["guard set NLL"], json.dumps(guard)[:2000]
    (check,) = guard["checks"]
    assert check["n"] == 30 and check["trained"] > check["baseline"] and check["interval"][1] < 0
    assert str(guard_file) in check["source"]
    # Improved on its task, REGRESSED on the guard: exit 4; were the task not improved, its own code.
    assert proc.returncode == (
        4 if summary["verdict"] == "improved" else 1 if summary["verdict"] == "not improved" else 3
    )
    assert "guard: REGRESSED on guard set NLL (" in proc.stdout, proc.stdout[-3000:]
    assert "Guard: **REGRESSED**" in (results / "report.md").read_text()
    assert ">REGRESSED</span>" in (results / "report.html").read_text()
    assert len(read_jsonl(results / "guard_trained_model.jsonl")) == 30


def test_rl_run_on_arithmetic_env(tmp_path: Path, tiny_model: str) -> None:
    proc = train(
        [
            "env=arithmetic",
            f"model_name={tiny_model}",
            "renderer_name=role_colon",
            "batch_size=2",
            "group_size=2",
            "max_steps=2",
            "max_tokens=6",
            "max_eval_rows=6",
            "save_every=0",
            "eval_every=0",
            "run_name=rl_e2e",
            "backend=local",
            "lora_rank=4",
        ],
        tmp_path,
    )
    assert proc.returncode in FINISHED, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((tmp_path / "results" / "summary.json").read_text())
    validate_summary(summary)
    assert (
        summary["task_type"] == "rl" and summary["method"] == "rl" and 0.0 <= summary["trained_score"] <= 1.0
    )
    rows = read_jsonl(tmp_path / "results" / "trained_model.jsonl")
    assert len(rows) == 6
    assert set(rows[0]) >= {"index", "question", "ground_truth", "completion", "extracted_answer", "correct"}
    assert rows[0]["question"].startswith("What is ")
    metrics = read_jsonl(tmp_path / "results" / "logs" / "rl_e2e" / "metrics.jsonl")
    assert any("env/all/reward/total" in m for m in metrics)
    if proc.returncode == 1:
        assert "did NOT improve" in proc.stdout


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["ppo_clip=0.3"], UNSUPPORTED_SENTENCE),
        (["gae_lambda=0.9"], UNSUPPORTED_SENTENCE),
        (["batch_size=abc"], "batch_size"),
        (["backend=tinker", "model_name=Qwen/Qwen3-8B"], "Missing required environment variables"),
    ],
)
def test_bad_settings_fail_in_one_line(tmp_path: Path, args: list[str], needle: str) -> None:
    env = {"TINKER_API_KEY": "", "WANDB_API_KEY": "", "WANDB_PROJECT": ""}
    proc = train_here(args, tmp_path, extra_env=env)
    assert proc.returncode == 2
    assert needle in proc.stderr
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "results" / "summary.json").exists()


def test_malformed_row_is_reported_before_training(tmp_path: Path) -> None:
    data = tmp_path / "bad.jsonl"
    data.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "c", "completion": \n')
    proc = train_here([f"dataset={data}", "backend=local"], tmp_path)
    assert proc.returncode == 2
    assert "bad.jsonl" in proc.stderr and "line 2" in proc.stderr
    assert "Traceback" not in proc.stderr
