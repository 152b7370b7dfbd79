"""Code RL on stdin/stdout problems, end to end as a user runs it (`train.py` in a subprocess, no task= or env=)
against the session's local engine with the tiny model: the data picks RL with env=code, every sample's program
runs once per test in the sandbox, and the rows carry the per-test verdicts. The tiny model's programs are
noise; what is checked is the wiring."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from runs import FINISHED, read_jsonl, rl_results, train_here

pytestmark = pytest.mark.skipif(shutil.which("bwrap") is None, reason="bubblewrap is not installed")


def test_stdio_code_problems_train_with_rl_and_record_per_test_results(
    tmp_path: Path, engine, tiny_model: str
):
    rows = [
        {
            "question": f"Read an integer n and print n + {i}.",
            "tests": json.dumps(
                [{"input": f"{n}\n", "output": f"{n + i}\n", "testtype": "stdin"} for n in (1, 5)]
            ),
        }
        for i in range(40)
    ]
    data, held_out = tmp_path / "stdio.jsonl", tmp_path / "stdio_eval.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    # The other layout for the held-out rows: parallel inputs/outputs lists.
    held_out.write_text(
        "".join(
            json.dumps(
                {
                    "question": f"Read an integer n and print n * {k}.",
                    "inputs": ["2\n", "3\n", "4\n"],
                    "outputs": [f"{2 * k}\n", f"{3 * k}\n", f"{4 * k}\n"],
                }
            )
            + "\n"
            for k in range(2, 6)
        )
    )
    proc = train_here(
        [
            f"dataset={data}",
            f"eval_dataset={held_out}",
            f"model_name={tiny_model}",
            f"base_url={engine.url}",
            "run_name=stdio",
            "renderer_name=role_colon",
            "batch_size=2",
            "group_size=2",
            "max_steps=1",
            "max_tokens=16",
            "max_eval_rows=4",
            "save_every=0",
            "eval_every=0",
            "lora_rank=4",
        ],
        tmp_path,
    )
    assert proc.returncode in FINISHED, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary, base, trained = rl_results(tmp_path / "results")
    assert summary["dataset"]["env"] == "code" and summary["score_label"].startswith("pass rate")
    for row in base + trained:
        assert row["ground_truth"].startswith("3 stdin/stdout test(s)")
        details = row["details"]
        assert details["grader"] == "code_stdio" and details["tests_total"] == 3
        assert len(details["tests"]) == 3 and details["tests_passed"] == sum(
            t["passed"] for t in details["tests"]
        )
        assert all(t["passed"] or t["failure"] for t in details["tests"])
        assert row["reward"] == pytest.approx(details["tests_passed"] / 3)
    problems = read_jsonl(tmp_path / summary["log_path"] / "data" / "train_problems.jsonl")
    for problem in problems:
        assert problem["grader"] == "code_stdio" and [t["input"] for t in problem["tests"]] == ["1\n", "5\n"]
        assert "reads its input from standard input" in problem["instruction"]
    metrics = read_jsonl(tmp_path / summary["log_path"] / "metrics.jsonl")
    assert any("env/all/score" in m for m in metrics)
