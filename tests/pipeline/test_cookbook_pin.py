"""What posttrain relies on in the pinned tinker-cookbook and tinker SDK, checked so that moving a pin fails here,
loudly and by name, rather than somewhere deep in a run; and the cookbook's own recipes, unmodified, against the
local engine."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tomllib
import typing
from importlib import metadata
from pathlib import Path

import chz
import pytest
from runs import REPO

# The cookbook Config fields posttrain's methods set (pipeline/methods/*: RunContext.loop_settings and
# rl_settings, and each method's own), by the config class that takes them.
CONFIG_FIELDS = {
    "tinker_cookbook.supervised.train:Config": {
        "log_path",
        "model_name",
        "renderer_name",
        "learning_rate",
        "lora_rank",
        "base_url",
        "save_every",
        "eval_every",
        "wandb_project",
        "wandb_name",
        "recipe_name",
        "dataset_builder",
        "lr_schedule",
        "num_epochs",
        "max_steps",
    },
    "tinker_cookbook.rl.train:Config": {
        "log_path",
        "model_name",
        "renderer_name",
        "learning_rate",
        "lora_rank",
        "base_url",
        "save_every",
        "eval_every",
        "wandb_project",
        "wandb_name",
        "recipe_name",
        "dataset_builder",
        "max_tokens",
        "temperature",
        "loss_fn",
        "kl_penalty_coef",
        "max_steps",
    },
    "tinker_cookbook.preference.train_dpo:Config": {
        "log_path",
        "model_name",
        "renderer_name",
        "learning_rate",
        "lora_rank",
        "base_url",
        "save_every",
        "eval_every",
        "wandb_project",
        "wandb_name",
        "recipe_name",
        "dataset_builder",
        "dpo_beta",
        "lr_schedule",
        "num_epochs",
        "max_steps",
    },
    "tinker_cookbook.distillation.train_on_policy:Config": {
        "log_path",
        "model_name",
        "renderer_name",
        "learning_rate",
        "lora_rank",
        "base_url",
        "save_every",
        "eval_every",
        "wandb_project",
        "wandb_name",
        "recipe_name",
        "dataset_configs",
        "max_tokens",
        "temperature",
        "kl_penalty_coef",
        "loss_fn",
        "max_steps",
    },
    "tinker_cookbook.supervised.types:ChatDatasetBuilderCommonConfig": {
        "model_name_for_tokenizer",
        "renderer_name",
        "max_length",
        "batch_size",
        "train_on_what",
    },
    "tinker_cookbook.distillation.datasets:DistillationDatasetConfig": {
        "dataset_builder",
        "teacher_config",
        "groups_per_batch",
    },
    "tinker_cookbook.distillation.datasets:TeacherConfig": {"base_model", "load_checkpoint_path"},
}


def _config_class(path: str) -> type:
    import importlib

    module, _, name = path.partition(":")
    return getattr(importlib.import_module(module), name)


def test_the_installed_cookbook_and_sdk_are_the_pinned_ones():
    pins = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    for package in ("tinker", "tinker-cookbook"):
        pin = next(p for p in pins if p.split("[")[0].split("=")[0] == package)
        assert metadata.version(package) == pin.rsplit("==", 1)[1], pin


@pytest.mark.parametrize("config_path", sorted(CONFIG_FIELDS))
def test_every_config_field_posttrain_sets_exists(config_path: str):
    fields = set(chz.chz_fields(_config_class(config_path)))
    missing = CONFIG_FIELDS[config_path] - fields
    assert not missing, f"{config_path} no longer has {sorted(missing)}"


def test_the_engine_implements_every_built_in_loss_of_the_sdk():
    from tinker.types import LossFnType

    from posttrain.engine import losses

    # `custom` is computed by the client (forward_backward_custom) and never sent by name.
    assert set(losses.LOSSES) == set(typing.get_args(LossFnType)) - {"custom"}
    assert set(losses.REQUIRED_INPUTS) == set(losses.LOSSES)


def test_every_renderer_the_model_table_recommends_is_known_to_preflight():
    from posttrain.config.renderers import BUILTIN_RENDERERS, renderer_exists
    from posttrain.pipeline.setup.preflight import cookbook_models

    for name, attributes in cookbook_models().items():
        for renderer in attributes.recommended_renderers:
            assert renderer in BUILTIN_RENDERERS and renderer_exists(renderer), (name, renderer)


def test_the_model_table_knows_the_current_lineup():
    """Tinker's lineup as of 2026-12 (cookbook issue #841 and 0.6.1): the offline fallback must know them."""
    from tinker_cookbook import model_info

    from posttrain.pipeline.setup.preflight import cookbook_models

    current = [
        "Qwen/Qwen3.8-27B",
        "Qwen/Qwen3.6-35B-A3B",
        "Qwen/Qwen3.6-27B",
        "Qwen/Qwen3.5-397B-A17B",
        "Qwen/Qwen3.5-35B-A3B-Base",
        "Qwen/Qwen3.5-9B",
        "Qwen/Qwen3.5-9B-Base",
        "Qwen/Qwen3.5-4B",
        "Qwen/Qwen3-8B",
        "openai/gpt-oss-120b",
        "openai/gpt-oss-20b",
        "deepseek-ai/DeepSeek-V3.1",
        "moonshotai/Kimi-K2.6",
    ]
    table = cookbook_models()
    for name in current:
        assert name in table, name
        assert model_info.get_recommended_renderer_name(name) == table[name].recommended_renderers[0]


# ----------------------------------------------------------------------------------------------------------
# The cookbook's own recipes, unmodified, against the local engine


def _recipe(module: str, args: list[str], url: str, log_path: Path) -> list[dict]:
    env = {**os.environ, "TINKER_BASE_URL": url, "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", module, *args, f"log_path={log_path}", "behavior_if_log_dir_exists=delete"],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return [json.loads(line) for line in (log_path / "metrics.jsonl").read_text().splitlines()]


def test_chat_sl_recipe_trains_on_the_cookbooks_example_conversations(engine, tiny_model, tmp_path):
    import tinker_cookbook

    data = Path(tinker_cookbook.__file__).parent / "example_data" / "conversations.jsonl"
    metrics = _recipe(
        "tinker_cookbook.recipes.chat_sl.train",
        [
            f"model_name={tiny_model}",
            "renderer_name=role_colon",
            f"dataset={data}",
            "batch_size=8",
            "max_steps=2",
            "max_length=256",
            "eval_every=0",
            "save_every=0",
            f"base_url={engine.url}",
        ],
        engine.url,
        tmp_path / "chat_sl",
    )
    nll = [m["train_mean_nll"] for m in metrics if "train_mean_nll" in m]
    assert len(nll) == 2 and all(x > 0 for x in nll)


def test_math_rl_recipe_trains_with_its_default_stable_reinforce(engine, tiny_model, tmp_path):
    log_path = tmp_path / "math_rl"
    metrics = _recipe(
        "tinker_cookbook.recipes.math_rl.train",
        [
            f"model_name={tiny_model}",
            "renderer_name=role_colon",
            "env=arithmetic",
            "groups_per_batch=2",
            "group_size=2",
            "max_steps=2",
            "eval_every=0",
            "save_every=0",
            f"base_url={engine.url}",
        ],
        engine.url,
        log_path,
    )
    assert json.loads((log_path / "config.json").read_text())["loss_fn"] == "stable_reinforce"
    steps = [m["step"] for m in metrics if "env/all/reward/total" in m]
    assert steps == [0, 1]


def test_guess_number_recipe_plays_and_trains(engine, tiny_model, tmp_path):
    metrics = _recipe(
        "tinker_cookbook.recipes.multiplayer_rl.guess_number.train",
        [
            f"model_name={tiny_model}",
            "renderer_name=role_colon",
            "batch_size=2",
            "group_size=2",
            "max_tokens=8",
            "max_steps=1",
            "eval_every=0",
            "save_every=0",
        ],
        engine.url,
        tmp_path / "guess_number",
    )
    assert [m["step"] for m in metrics if "env/all/reward/total" in m] == [0]
