"""task=pairwise_rl end to end (the cookbook's pairwise-preference environments and rl.train through the real SDK on
the local engine with the tiny model): the built-in `shorter`, a user's preference function that crashes and hangs
(recorded, never stopping the run), the held-out win rate against the base model's answers, and bad settings."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from runs import read_jsonl, rl_results, train, train_here

FAST = ["renderer_name=role_colon", "lora_rank=4", "save_every=0", "eval_every=0", "batch_size=2", "group_size=4",
        "max_steps=2", "max_tokens=10", "max_eval_rows=4"]  # fmt: skip

PREFERENCE = """
import time

def prefer(row, completion):
    asked = row["prompt"][-1]["content"]
    if "number 7." in asked:
        raise ValueError("no opinion on seven")
    if "number 3." in asked:
        time.sleep(10**6)
    return 1.0 if len(completion) < len(row["other"]) else 0.0 if len(completion) > len(row["other"]) else 0.5
"""


@pytest.fixture(scope="module")
def prompts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("data") / "prompts.jsonl"
    rows = [{"prompt": f"Say the number {i}.", "completion": f"Number {i}."} for i in range(40)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _run(tmp_path: Path, engine, model: str, prompts: Path, args: list[str]) -> tuple[dict, list[dict], list[dict]]:
    proc = train([f"dataset={prompts}", f"model_name={model}", f"base_url={engine.url}", "run_name=pw", *FAST, *args],
                 tmp_path, timeout=600)  # fmt: skip
    assert proc.returncode in (0, 1), proc.stdout[-3000:] + proc.stderr[-3000:]
    summary, base, trained = rl_results(tmp_path / "results")
    return summary, base, trained


def test_shorter_answers_win_and_the_trained_model_is_compared_with_the_base_model(
    tmp_path: Path, engine, tiny_model: str, prompts: Path
):
    summary, base, trained = _run(tmp_path, engine, tiny_model, prompts, ["task=pairwise_rl"])
    assert summary["method"] == "pairwise_rl" and summary["preference_model"] == "shorter"
    assert summary["score_label"] == "win rate against the base model's answers (shorter)"
    assert summary["baseline_score"] == 0.5 and all(r["reward"] == 0.5 for r in base)  # itself: a tie
    # Each trained answer against the base answer to the same prompt, by length, both orders.
    for b, t in zip(base, trained, strict=True):
        assert t["question"] == b["question"] and t["ground_truth"] == b["completion"]
        shorter = (len(t["completion"]) < len(b["completion"])) - (len(t["completion"]) > len(b["completion"]))
        assert t["reward"] == 0.5 + shorter / 2 and t["details"]["chars"] == len(t["completion"])
    assert summary["trained_score"] == pytest.approx(sum(r["reward"] for r in trained) / len(trained))
    assert set(summary["answer_chars"]) == {"base", "trained"}
    log = tmp_path / summary["log_path"]
    assert len(read_jsonl(log / "data" / "train_prompts.jsonl")) == 36  # one epoch of the 36 training prompts
    steps = [m for m in read_jsonl(log / "metrics.jsonl") if "env/all/reward/total" in m]
    assert len(steps) == 2  # the cookbook's rl.train over its pairwise-preference environments


def test_a_preference_function_that_crashes_or_hangs_is_recorded_and_the_run_goes_on(
    tmp_path: Path, engine, tiny_model: str, prompts: Path
):
    (tmp_path / "prefer.py").write_text(PREFERENCE)
    args = ["preference_model=prefer.py:prefer", "verifier_timeout=1"]  # task=auto: chosen by the setting
    summary, _, trained = _run(tmp_path, engine, tiny_model, prompts, args)
    assert summary["method"] == "pairwise_rl" and summary["preference_model"] == "prefer.py:prefer"
    errors = summary["verifier_errors"]
    held_out = {r["question"] for r in trained}
    expected = sum(2 for q in held_out if q.endswith(("number 7.", "number 3.")))  # both orders
    assert errors["by_phase"].get("trained model", 0) == expected
    if errors["count"]:
        assert "prefer.py:" in errors["first"]
    log = (tmp_path / summary["log_path"] / "verifier_errors.jsonl").read_text()
    assert log.count("prefer.py:7: ValueError: no opinion on seven") + log.count("timed out after 1 s") == errors["count"]
    for row in trained:  # a failed comparison is a tie
        if row["question"].endswith(("number 7.", "number 3.")):
            assert row["reward"] == 0.5


def test_the_preference_reaches_the_cookbook_on_its_scale(tmp_path: Path):
    """The cookbook's PreferenceModel returns 1 when completion B is preferred and -1 when A is (its environments
    credit B with a positive value): the shorter answer must win there, in either position."""
    import asyncio

    from tinker_cookbook.preference.types import Comparison

    from posttrain.pipeline.methods.pairwise_rl import PreferenceModelBuilder

    (tmp_path / "prefer.py").write_text(PREFERENCE)
    prompt = [{"role": "user", "content": "Say the number 1."}]
    short, long = [{"role": "assistant", "content": "One."}], [{"role": "assistant", "content": "The number one."}]
    for spec in ("shorter", f"{tmp_path}/prefer.py:prefer"):
        model = PreferenceModelBuilder(spec=spec)()
        assert asyncio.run(model(Comparison(prompt, short, long))) == -1.0  # A, the shorter, preferred
        assert asyncio.run(model(Comparison(prompt, long, short))) == 1.0
        assert asyncio.run(model(Comparison(prompt, short, short))) == 0.0


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["task=pairwise_rl", "preference_model=longer"], "preference_model='longer': expected shorter or path/to/"),
        (["task=pairwise_rl", "preference_model=missing.py:f"], "missing.py not found"),
        (["task=sft", "preference_model=shorter"], "preference_model is only used by task=pairwise_rl, not task=sft; leave it out"),
        (["task=pairwise_rl", "env=math"], "env is not used by task=pairwise_rl"),
    ],
)
def test_bad_pairwise_settings_are_one_line(tmp_path: Path, args: list[str], message: str):
    proc = train_here([*args, "backend=local"], tmp_path)
    assert proc.returncode == 2 and message in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
