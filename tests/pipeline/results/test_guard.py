"""The guard: did training make the model worse at what it was not trained on (summary.json `guard`)?"""

from __future__ import annotations

import json
import random
from pathlib import Path
from types import SimpleNamespace

import pytest
from runs import data_error, write_jsonl

from posttrain.errors import ConfigError
from posttrain.pipeline.evaluation.guard import GUARD_ROWS, NAME, load_guard, shipped_conversations
from posttrain.pipeline.results.guard import guard_summary
from posttrain.pipeline.results.rows import PreferenceExample, RLExample, SFTExample
from posttrain.pipeline.settings import parse_train_args


def nll_rows(means: list[float]) -> list[dict]:
    return [SFTExample(i, "p", "c", m).to_dict() for i, m in enumerate(means)]


def general(base: list[float], trained: list[float]) -> tuple[str, str, list, list]:
    return (NAME, "shipped", nll_rows(base), nll_rows(trained))


def test_a_clearly_worse_guard_nll_regressed():
    rng = random.Random(0)
    base = [1.5 + rng.gauss(0, 0.3) for _ in range(64)]
    guard = guard_summary(general(base, [b + 0.4 + rng.gauss(0, 0.1) for b in base]), [], [])
    (check,) = guard["checks"]
    assert check["regressed"] and guard["regressed"] == [NAME] and check["interval"][1] < 0
    assert check["trained"] > check["baseline"] and check["n"] == 64
    assert guard["text"].startswith(f"REGRESSED on {NAME} (")


def test_a_tiny_certain_drift_or_noise_is_no_regression():
    rng = random.Random(1)
    base = [1.5 + rng.gauss(0, 0.3) for _ in range(64)]
    drift = guard_summary(general(base, [b + 0.02 for b in base]), [], [])  # certain, but 1% of the base NLL
    noise = guard_summary(general(base, [b + rng.gauss(0, 0.3) for b in base]), [], [])
    for guard in (drift, noise):
        assert guard["regressed"] == [] and guard["text"].startswith("no regression on the guard")
    assert drift["checks"][0]["interval"][1] < 0  # worse beyond noise, yet not materially


def test_preference_runs_check_the_greedy_answers_task_score_and_length():
    """The DPO trap: preference accuracy up, the model's own answers right less often (14 -> 3 of 16)."""

    def pref(i: int, task_correct: bool, answer: str) -> PreferenceExample:
        return PreferenceExample(
            i, "p", "c", "r", -1.0, -2.0, 1.0, True, None, "4", answer, "4", task_correct
        )

    base = [pref(i, i < 14, "#### 4") for i in range(16)]
    trained = [pref(i, i < 3, "well, let me think about it at length... #### 4") for i in range(16)]
    guard = guard_summary(None, base, trained)
    (task,) = guard["checks"]
    assert (
        task["name"] == "task accuracy of greedy answers"
        and task["regressed"]
        and task["test"] == "mcnemar_exact"
    )
    assert task["baseline"] == pytest.approx(14 / 16) and task["trained"] == pytest.approx(3 / 16)
    assert guard["answer_chars"]["ratio"] > 5 and "characters on average" in guard["text"]


def test_rl_rows_report_answer_length_and_sft_rows_do_not():
    base = [RLExample(i, "q", "1", "#### 1", "1", True).to_dict() for i in range(4)]
    trained = [
        RLExample(i, "q", "1", "The answer, after much thought, is #### 1", "1", True).to_dict()
        for i in range(4)
    ]
    assert guard_summary(None, base, trained)["answer_chars"]["trained"] > 30
    assert "answer_chars" not in guard_summary(None, nll_rows([1.0] * 4), nll_rows([0.5] * 4))


def test_the_default_guard_set_is_shipped_and_leaves_out_training_rows():
    cfg = parse_train_args([])
    guard = load_guard(cfg, [])
    assert guard is not None and len(guard.rows) == GUARD_ROWS and guard.name == NAME
    shipped = [
        json.loads(line) for line in Path(shipped_conversations()).read_text().splitlines() if line.strip()
    ]
    assert guard.rows[0]["messages"] == shipped[0]["messages"]
    overlapping = load_guard(
        cfg, [{"messages": shipped[0]["messages"]}, {"messages": shipped[5]["messages"]}]
    )
    assert shipped[0]["messages"] not in [r["messages"] for r in overlapping.rows]
    assert "2 left out (also training rows)" in overlapping.source
    assert load_guard(parse_train_args(["guard=false"]), []) is None


def test_a_users_guard_set_is_read_and_bad_rows_named(tmp_path: Path):
    good = write_jsonl(
        tmp_path / "mine.jsonl",
        [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}] * 3,
    )
    guard = load_guard(SimpleNamespace(guard=True, guard_dataset=str(good)), [])
    assert guard is not None and len(guard.rows) == 3 and str(good) in guard.source
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"messages": [{"role": "user", "content": "no reply"}]}])
    message = data_error(lambda: load_guard(SimpleNamespace(guard=True, guard_dataset=str(bad)), []))
    assert message.startswith(f'guard_dataset: {bad} line 1: needs "messages"')
    with pytest.raises(ConfigError, match="guard_dataset= is a guard set, and guard=false"):
        parse_train_args(["guard=false", f"guard_dataset={good}"])
