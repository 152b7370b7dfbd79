"""dry_run=true: the plan before a run (token counts, the Tinker price arithmetic, the local time probe)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from runs import REPO

from posttrain.pipeline.setup.plan import TokenBudget, estimated_seconds, tinker_price


def _budget(**kw) -> TokenBudget:
    base = dict(train=2_000_000, prefill=500_000, sample=250_000, train_steps=10, sequences_per_step=32,
                mean_train_length=300.0)  # fmt: skip
    return TokenBudget(**{**base, **kw})


def test_tinker_price_is_tokens_times_the_published_rates():
    from tinker_cost import PRICING

    prefill_rate, sample_rate, train_rate = PRICING["Qwen/Qwen3-8B"]
    cost = tinker_price("Qwen/Qwen3-8B", _budget())
    expected = 2.0 * train_rate + 0.5 * prefill_rate + 0.25 * sample_rate
    assert cost["usd"] == pytest.approx(expected, abs=1e-4)
    assert cost["usd_by_kind"]["train"] == pytest.approx(2.0 * train_rate, abs=1e-4)
    assert "tinker-cost" in cost["source"] and "tinker-docs.thinkingmachines.ai" in cost["source"]


def test_tinker_price_says_when_a_model_has_no_published_price():
    cost = tinker_price("meta-llama/Llama-3.2-1B", _budget())
    assert cost["usd"] is None and "no published price" in cost["note"]


def test_estimated_seconds():
    rates = {"train_tokens_per_s": 1000.0, "prefill_tokens_per_s": 5000.0, "sample_tokens_per_s": 250.0}
    assert estimated_seconds(_budget(), rates) == pytest.approx(2000 + 100 + 1000)


def test_dry_run_plans_without_training_or_touching_results(tmp_path: Path, tiny_model: str) -> None:
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"Say {i}.", "completion": f"{i}."}) + "\n" for i in range(40)))
    env = {**os.environ, "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1"}
    args = [f"dataset={data}", f"model_name={tiny_model}", "renderer_name=role_colon", "batch_size=4",
            "backend=local", "dry_run=true"]  # fmt: skip
    proc = subprocess.run(
        [sys.executable, str(REPO / "train.py"), *args], cwd=tmp_path, env=env, capture_output=True, text=True,
        timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    plan = [line for line in proc.stdout.splitlines() if line.startswith("plan: ")]
    # 36 training rows, batch 4 -> 9 steps a pass, 2 passes for SFT's minimum of 10 (num_epochs not given);
    # every training token counted from the rendered data.
    assert any(line.startswith("plan: 18 steps of 4 sequences") for line in plan), plan
    assert any("estimated time on this machine" in line and "tokens/s" in line for line in plan), plan
    assert not (tmp_path / "results").exists()


def test_the_speed_probe_fits_a_long_multi_turn_budget_in_the_models_context(tmp_path: Path, tiny_model: str) -> None:
    # Tool use at the default max_tokens=256: 4 turns make an upper-bound training length beyond the tiny model's
    # 2048-token context; the probe measures its rates at a length that fits.
    env = {**os.environ, "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1"}
    args = ["env=tools:search", f"model_name={tiny_model}", "renderer_name=qwen3_instruct", "batch_size=2", "group_size=2",
            "max_steps=1", "backend=local", "dry_run=true"]  # fmt: skip
    proc = subprocess.run(
        [sys.executable, str(REPO / "train.py"), *args], cwd=tmp_path, env=env, capture_output=True, text=True,
        timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert any("estimated time on this machine" in line for line in proc.stdout.splitlines())
