"""`posttrain examples`: every example's command is valid and self-contained, checked with one step each on the
tiny model (the gallery's real numbers come from `examples all` with the default model; see README). First in
the collection order on purpose: its one test is the suite's longest, and started last it would be the tail."""

from __future__ import annotations

import json
from pathlib import Path

from runs import posttrain, read_jsonl

from posttrain.gallery.examples import EXAMPLES

X86_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16")  # the flags util.processor records, where present


def test_every_example_runs_one_step_and_the_table_is_written(tmp_path: Path, engine, tiny_model: str):
    out = tmp_path / "gallery"
    overrides = [
        f"model_name={tiny_model}",
        "renderer_name=role_colon",
        f"base_url={engine.url}",
        "max_steps=1",
        "batch_size=2",
        "max_eval_rows=2",
        "max_train_rows=12",
        "lora_rank=4",
    ]
    proc = posttrain(["examples", "all", f"out={out}", *overrides], tmp_path)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    # One step is too few to move a metric: each run says so on the terminal before it trains.
    short = "warning: task=rl needs at least 16 optimizer steps to move its metric"  # math_rl, the first
    assert short in proc.stdout and proc.stdout.index(short) < proc.stdout.index("training: 1 steps"), (
        proc.stdout[-4000:]
    )
    table = json.loads((out / "gallery.json").read_text())
    assert [r["example"] for r in table["examples"]] == list(EXAMPLES)
    machine = table["machine"]
    # The processor as it is, on any architecture: avx2 is recorded where /proc/cpuinfo has it (an ARM machine
    # has none of these x86 flags, and may have no cpuinfo model name at all).
    cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    assert isinstance(machine["cpu"], str) and machine["cpu"] and machine["cores"] >= 1
    assert isinstance(machine["cpu_flags"], list) and set(machine["cpu_flags"]) <= set(X86_FLAGS)
    assert ("avx2" in machine["cpu_flags"]) == (" avx2" in cpuinfo)
    for row in table["examples"]:
        assert row["result"] and "error" not in row, row  # each stage finished and was evaluated
        assert row["command"] == f"uv run posttrain examples {row['example']}"
        # Every row gives the change with its interval and verdict, and what the guard evaluation found.
        # (one step and 2 held-out examples here: mostly "too few examples to tell")
        assert row["interval"].rsplit(": ", 1)[-1] in ("improved", "not improved", "inconclusive")
        assert "]" in row["interval"] or "too few examples to tell (n = " in row["interval"]
        assert (
            "no regression (" in row["guard"] or "REGRESSED (" in row["guard"]
        ) and "general chat NLL" in row["guard"]
        example = EXAMPLES[row["example"]]
        for stage in example.stages:
            folder = out / example.name / stage.name
            summary = json.loads((folder / "summary.json").read_text())
            assert summary["status"] != "failed" and summary["model"] == tiny_model
            assert (folder / "report.md").exists() and read_jsonl(folder / "trained_model.jsonl")
    md = (out / "gallery.md").read_text()
    assert all(f"| {name} |" in md for name in EXAMPLES) and "cores" in md
    assert "| change, 95% interval, test, n: verdict | guard |" in md
    # Self-contained: the distillation's teacher is the rl stage built in the same command.
    rl = json.loads((out / "distillation" / "rl" / "summary.json").read_text())
    for mode in ("off_policy", "on_policy"):  # both modes, from the same teacher, both in the table's row
        distilled = json.loads((out / "distillation" / mode / "summary.json").read_text())
        assert distilled["hyperparameters"]["teacher_model"] == rl["checkpoint_path"].rstrip("/")
        assert distilled["hyperparameters"]["distillation_mode"] in (
            mode,
            None if mode == "off_policy" else mode,
        )
    row = next(r for r in table["examples"] if r["example"] == "distillation")
    assert row["result"].startswith("off_policy: Base NLL") and "; on_policy: Base NLL" in row["result"]
    # Each mode's task accuracy beside its NLL: the student's answers graded as the teacher's were.
    for mode in ("off_policy", "on_policy"):
        distilled = json.loads((out / "distillation" / mode / "summary.json").read_text())
        accuracy = f"task accuracy {distilled['baseline_task_accuracy']:.0%} → {distilled['trained_task_accuracy']:.0%}"
        assert f"{mode}: {distilled['headline']}, {accuracy}" in row["result"]
    # Code RL: the harder generated tasks, HumanEval measured for both models and shown beside them.
    code = json.loads((out / "code_rl" / "rl" / "summary.json").read_text())
    assert code["dataset"]["source"].startswith("harder generated function-writing tasks")
    humaneval = code["humaneval_score"]
    row = next(r for r in table["examples"] if r["example"] == "code_rl")
    assert f"; HumanEval pass@1 {humaneval['baseline']:.1%} → {humaneval['trained']:.1%}" in row["result"]
    # Chat SFT: generated multi-turn conversations, every assistant turn trained.
    chats = read_jsonl(out / "chat_sft" / "chats.jsonl")
    assert all(sum(m["role"] == "assistant" for m in c["messages"]) == 3 for c in chats)
    chat = json.loads((out / "chat_sft" / "sft" / "summary.json").read_text())
    assert chat["hyperparameters"]["train_on_what"] == "all_assistant_messages"


def test_list_and_unknown_names(tmp_path: Path):
    proc = posttrain(["examples", "list"], tmp_path)
    assert proc.returncode == 0 and all(f"{name}:" in proc.stdout for name in EXAMPLES)
    assert "tinker://<the rl run's checkpoint_path>" in proc.stdout
    proc = posttrain(["examples", "math_rl", "nope"], tmp_path)
    assert (
        proc.returncode == 2
        and proc.stderr.strip() == f"error: no example named nope; examples: {', '.join(EXAMPLES)}, all"
    )
    assert not (tmp_path / "gallery").exists()


def test_ctrl_c_stops_the_running_example_and_the_command(tmp_path: Path, engine, tiny_model: str):
    import os
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "gallery"
    args = [
        "examples",
        "instruction_sft",
        f"out={out}",
        f"model_name={tiny_model}",
        "renderer_name=role_colon",
        f"base_url={engine.url}",
        "max_steps=50",
        "batch_size=2",
        "lora_rank=4",
    ]
    env = {**os.environ, "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "posttrain.cli.main", *args],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    logs = out / "instruction_sft" / "sft" / "logs"
    deadline = time.monotonic() + 120
    while not any(logs.glob("*/metrics.jsonl")) and time.monotonic() < deadline:  # training has begun
        time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stdout[-2000:] + stderr[-2000:]
    assert "interrupted: partial results were written" in stderr  # the run's own clean stop
    assert stderr.strip().splitlines()[-1].startswith("interrupted: examples stopped")
    assert "Traceback" not in stderr
    found = subprocess.run(["pgrep", "-f", "run_name=instruction_sft-sft"], capture_output=True, text=True)
    assert found.stdout.strip() == ""  # the train run is gone too
