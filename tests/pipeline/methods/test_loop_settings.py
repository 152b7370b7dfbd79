"""The fields of the cookbook Configs that the user's document lists are settings of the methods whose loop takes
them: each reaches the cookbook's Config (read back from the run's config.json, which the cookbook loop writes),
and a method whose loop lacks it refuses it in one line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from runs import FINISHED, read_jsonl, train_here

FAST = ["save_every=0", "eval_every=0", "lora_rank=4", "eval_concurrency=8", "max_eval_rows=4"]


def _run(tmp_path: Path, engine, model: str, args: list[str], name: str) -> tuple[dict, dict]:
    proc = train_here(
        [*args, *FAST, f"model_name={model}", f"base_url={engine.url}", f"run_name={name}"], tmp_path
    )
    assert proc.returncode in FINISHED, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((tmp_path / "results" / "summary.json").read_text())
    assert summary.get("status") != "failed", summary.get("error")
    return summary, json.loads((tmp_path / summary["log_path"] / "config.json").read_text())


@pytest.fixture(scope="module")
def chat_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("data") / "chat.jsonl"
    rows = [{"prompt": f"Say {i}.", "completion": f"Number {i}."} for i in range(60)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_supervised_settings_reach_the_config_and_a_run_starts_from_a_saved_state(
    tmp_path: Path, engine, tiny_model: str, chat_data: Path
):
    args = [f"dataset={chat_data}", "renderer_name=role_colon", "batch_size=8", "max_steps=2"]
    first_dir, second_dir = tmp_path / "first", tmp_path / "second"
    first_dir.mkdir(), second_dir.mkdir()
    tuned = ["adam_beta1=0.8", "adam_beta2=0.9", "adam_eps=1e-6", "lr_schedule=cosine", "wandb_name=my-sft"]
    summary, config = _run(first_dir, engine, tiny_model, [*args, *tuned], "first")
    assert (config["adam_beta1"], config["adam_beta2"], config["adam_eps"]) == (0.8, 0.9, 1e-6)
    assert config["lr_schedule"] == "cosine" and config["wandb_name"] == "my-sft"
    assert {k: summary["hyperparameters"][k] for k in ("adam_beta1", "adam_beta2", "adam_eps")} == {
        "adam_beta1": 0.8,
        "adam_beta2": 0.9,
        "adam_eps": 1e-6,
    }
    assert "kl_penalty_coef" not in summary["hyperparameters"]  # only the settings SFT takes are recorded

    state = read_jsonl(first_dir / summary["log_path"] / "checkpoints.jsonl")[-1]["state_path"]
    again, config = _run(second_dir, engine, tiny_model, [*args, f"load_checkpoint_path={state}"], "second")
    assert (
        config["load_checkpoint_path"] == state and again["hyperparameters"]["load_checkpoint_path"] == state
    )
    # The baseline is the base model's, as in the first run; training went on from the first run's weights.
    assert again["baseline_nll"] == pytest.approx(summary["baseline_nll"], abs=1e-6)
    assert again["trained_nll"] < summary["trained_nll"]


RL = [
    "env=arithmetic",
    "renderer_name=role_colon",
    "batch_size=2",
    "group_size=2",
    "max_steps=2",
    "max_tokens=6",
]


def test_rl_loop_settings_reach_the_config(tmp_path: Path, engine, tiny_model: str):
    tuned = [
        "kl_penalty_coef=0.05",
        "kl_discount_factor=0.5",
        "num_substeps=2",
        "remove_constant_reward_groups=true",
    ]
    summary, config = _run(tmp_path, engine, tiny_model, [*RL, *tuned], "rl_tuned")
    assert (config["kl_penalty_coef"], config["kl_discount_factor"], config["num_substeps"]) == (0.05, 0.5, 2)
    assert config["remove_constant_reward_groups"] is True
    # the penalty's reference: the base model
    assert config["kl_reference_config"]["base_model"] == tiny_model
    metrics = read_jsonl(tmp_path / summary["log_path"] / "metrics.jsonl")
    # The loop measured the policy's KL to the base model each step (it does only with a penalty and a reference).
    assert all("kl_policy_base" in m for m in metrics if "env/all/reward/total" in m), metrics[0].keys()
    assert sum("kl_policy_base" in m for m in metrics) == 2


@pytest.mark.parametrize(
    ("setting", "key", "expected"),
    [
        ("max_steps_off_policy=1", "async_config", {"max_steps_off_policy": 1, "groups_per_batch": 2}),
        ("num_minibatches=2", "stream_minibatch_config", {"groups_per_batch": 2, "num_minibatches": 2}),
    ],
)
def test_async_and_streaming_rl(
    tmp_path: Path, engine, tiny_model: str, setting: str, key: str, expected: dict
):
    summary, config = _run(tmp_path, engine, tiny_model, [*RL, setting], key)
    assert {k: config[key][k] for k in expected} == expected
    assert summary["trained_score"] is not None


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["task=sft", "kl_discount_factor=0.5"], "kl_discount_factor is not used by task=sft (only by task="),
        (
            ["task=dpo", "max_steps_off_policy=1"],
            "max_steps_off_policy is not used by task=dpo (only by task=",
        ),
        (["env=arithmetic", "adam_beta1=0.8"], "adam_beta1 is not used by task=rl (only by task="),
        (["env=arithmetic", "lr_schedule=cosine"], "lr_schedule is not used by task=rl (only by task="),
        (
            ["teacher_model=x", "num_substeps=2"],
            "num_substeps is only used by distillation_mode=on_policy, not distillation_mode=off_policy",
        ),
        (
            ["teacher_model=x", "distillation_mode=on_policy", "adam_eps=1e-6"],
            "adam_eps is only used by distillation_mode=off_policy, not distillation_mode=on_policy",
        ),
        (["env=arithmetic", "max_steps_off_policy=1", "num_minibatches=2"], "do not go together"),
        (
            ["load_checkpoint_path=/tmp/x"],
            "load_checkpoint_path='/tmp/x' is not valid; expected a saved state",
        ),
    ],
)
def test_a_setting_the_method_does_not_take_is_refused(tmp_path: Path, args: list[str], message: str):
    proc = train_here([*args, "backend=local"], tmp_path)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
