"""dry_run=true: the plan before a run (token counts, the Tinker price arithmetic, the local time probe)."""

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from runs import REPO, without_guard

from posttrain.pipeline.setup.plan import (
    SequentialTurns,
    TokenBudget,
    estimated_seconds,
    plan_lines,
    sequential_turns,
    tinker_price,
)


def _budget(**kw) -> TokenBudget:
    base = dict(
        train=2_000_000,
        prefill=500_000,
        sample=250_000,
        train_steps=10,
        sequences_per_step=32,
        mean_train_length=300.0,
    )
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


def test_turns_played_one_after_another_bound_a_multi_turn_estimate():
    """Twenty questions planned 86 s for a run of 360 s: tokens / bulk throughput ignores that a game's turns wait
    for each other. With a turn's latency probed, the sampling time is at least turns-in-a-row x that latency."""
    rates = {
        "train_tokens_per_s": 1000.0,
        "prefill_tokens_per_s": 5000.0,
        "sample_tokens_per_s": 250.0,
        "turn_request_s": 0.05,
        "turn_token_s": 0.02,
    }
    small = _budget(train=1000, prefill=5000, sample=250)  # 1 s + 1 s + 1 s in bulk

    def planned(games_turns: int, partner: bool = False) -> float:
        # 3 training steps and 2 evaluations of one round each: 5 rounds of `games_turns` turns in a row
        turns = SequentialTurns(
            count=5 * games_turns,
            per_game=games_turns,
            requests=2 if partner else 1,
            tokens=16 + (5 if partner else 0),
            concurrency=8,
            context=300,
        )
        return estimated_seconds(dataclasses.replace(small, turns=turns), rates)

    # One turn: 0.05 s for the request and its first token, 15 more tokens at 0.02 s: 0.35 s.
    assert planned(1) == pytest.approx(1 + max(2, 5 * 0.35))
    assert planned(20) == pytest.approx(1 + 100 * 0.35)  # the turns in a row, not the bulk rate, set the time
    assert planned(20) - 1 == pytest.approx(2 * (planned(10) - 1))  # and it scales with the turns per game
    # A partner's reply is a second request each turn: its latency and its 5 tokens come after the policy's.
    assert planned(20, partner=True) == pytest.approx(1 + 100 * (2 * 0.05 + 19 * 0.02))
    # Single-turn budgets (and a probe without turn rates) keep the throughput estimate.
    assert estimated_seconds(small, rates) == pytest.approx(3)
    assert estimated_seconds(
        dataclasses.replace(small, turns=SequentialTurns(100, 20, 1, 16, 8, 300)),
        {k: v for k, v in rates.items() if not k.startswith("turn_")},
    ) == pytest.approx(3)


def test_the_turns_in_a_row_of_an_rl_run():
    cfg = SimpleNamespace(eval_every=0, eval_concurrency=64, batch_size=2, group_size=4, max_tokens=16)
    # 3 training steps, then the base and the trained model each play the 10 held-out games at once: 5 rounds.
    turns = sequential_turns(cfg, 20, 3, 10, partner=True, context=300)
    assert (turns.count, turns.per_game, turns.requests, turns.tokens) == (100, 20, 2, 16 + 5)
    assert turns.concurrency == 10  # the evaluation's 10 games; a training step plays 8
    # eval_every=1 adds an evaluation per step; eval_concurrency=4 plays 10 games in 3 rounds.
    busier = SimpleNamespace(**{**vars(cfg), "eval_every": 1, "eval_concurrency": 4})
    assert sequential_turns(busier, 20, 3, 10, partner=False, context=300).count == 20 * (3 + 5 * 3)


def test_the_plan_shows_a_turns_latency():
    turns = SequentialTurns(count=60, per_game=20, requests=2, tokens=13, concurrency=2, context=290)
    budget = dataclasses.replace(_budget(), turns=turns)
    rates = {
        "train_tokens_per_s": 1000.0,
        "prefill_tokens_per_s": 5000.0,
        "sample_tokens_per_s": 250.0,
        "turn_request_s": 0.1,
        "turn_token_s": 0.02,
    }
    outcome = {"tokens": budget.as_dict(), "rates": rates, "seconds": 100, "startup": 10}
    line = plan_lines(outcome)[-1]
    assert line.endswith("sample 250 tokens/s; a turn 0.42 s, 60 turns in a row)"), line


def test_dry_run_plans_without_training_or_touching_results(tmp_path: Path, tiny_model: str) -> None:
    data = tmp_path / "pairs.jsonl"
    data.write_text(
        "".join(json.dumps({"prompt": f"Say {i}.", "completion": f"{i}."}) + "\n" for i in range(40))
    )
    temp = tmp_path / "tmp"  # the system temp folder, where the plan keeps its logs while it runs
    temp.mkdir()
    env = {**os.environ, "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1", "TMPDIR": str(temp)}
    args = [
        f"dataset={data}",
        f"model_name={tiny_model}",
        "renderer_name=role_colon",
        "batch_size=4",
        "backend=local",
        "dry_run=true",
    ]
    proc = subprocess.run(
        [sys.executable, str(REPO / "train.py"), *without_guard(args)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    plan = [line for line in proc.stdout.splitlines() if line.startswith("plan: ")]
    # 36 training rows, batch 4 -> 9 steps a pass, 2 passes for SFT's minimum of 10 (num_epochs not given);
    # every training token counted from the rendered data.
    assert any(line.startswith("plan: 18 steps of 4 sequences") for line in plan), plan
    assert any("estimated time on this machine" in line and "tokens/s" in line for line in plan), plan
    assert not (tmp_path / "results").exists()
    assert list(temp.iterdir()) == []  # its logs are gone with it


def test_the_speed_probe_fits_a_long_multi_turn_budget_in_the_models_context(
    tmp_path: Path, tiny_model: str
) -> None:
    # Tool use at the default max_tokens=256: 4 turns make an upper-bound training length beyond the tiny model's
    # 2048-token context; the probe measures its rates at a length that fits.
    env = {**os.environ, "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1"}
    args = [
        "env=tools:search",
        f"model_name={tiny_model}",
        "renderer_name=qwen3_instruct",
        "batch_size=2",
        "group_size=2",
        "max_steps=1",
        "backend=local",
        "dry_run=true",
    ]
    proc = subprocess.run(
        [sys.executable, str(REPO / "train.py"), *without_guard(args)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert any("estimated time on this machine" in line for line in proc.stdout.splitlines())
    # Timed on a few sequences, not the run's whole step: 2048 tokens at the longest length the probe takes.
    assert (
        "training timed on 2 sequences of 1024 tokens, the run's steps extrapolated per token" in proc.stdout
    )
