"""Choosing the recipe (the user guide's "Choosing a Recipe"), and the default learning rate, from the registry.

`task=auto`: the first method (in registry order) whose own choosing settings are given (a teacher means
distillation, a system prompt prompt distillation, a grader rubric RL, `env=` RL, a preference model pairwise
RL), preferring one that takes every setting given (a grader with a preference model is pairwise RL's judge);
else the first that trains on the data's format; no data at all means the default SFT data.
"""

from __future__ import annotations

from typing import Any

import chz

from posttrain.errors import ConfigError
from posttrain.pipeline.data import LoadedData
from posttrain.pipeline.methods import METHODS, config_class
from posttrain.pipeline.settings import check_method_settings, given


def choose_task(cfg: Any, data: LoadedData | None) -> tuple[str, str]:
    """(the method, why). With task= given, that one; either way, its settings are then checked against it."""
    if cfg.task != "auto":
        return cfg.task, "task= given"
    task, why = _auto(cfg, data)
    check_method_settings(cfg, task)
    return task, why


def _auto(cfg: Any, data: LoadedData | None) -> tuple[str, str]:
    settings = set(given(cfg))
    chosen = {name: [s for s in entry.chosen_by if s in settings] for name, entry in METHODS.items()}
    candidates = [name for name, by in chosen.items() if by]
    if candidates:
        # The first would refuse a setting a later candidate takes (grader_model with preference_model): the
        # later one is meant. When none takes them all, the first is chosen and refuses the rest in one line.
        name = next(
            (n for n in candidates if settings <= set(chz.chz_fields(config_class(n)))), candidates[0]
        )
        setting = chosen[name][0]
        return name, f"{setting}={getattr(cfg, setting)}" if setting == "env" else f"{setting} is set"
    if data is None:
        return "sft", "no dataset: the default data"
    for name, entry in METHODS.items():
        if data.format in entry.formats:
            return name, f"{data.format} data"
    raise ConfigError(
        f"{data.source}: no training method in posttrain takes {data.format} data yet "
        f"(task= can be {', '.join(METHODS)})"
    )


def default_learning_rate(model_name: str, task: str) -> tuple[float, str]:
    """(the rate, where it comes from): the cookbook's calibration for the model, scaled by the method's policy."""
    from tinker_cookbook.hyperparam_utils import get_lr

    policy = METHODS[task].learning_rate
    try:
        lr = get_lr(model_name)
    except Exception:  # noqa: BLE001 - models outside the cookbook's calibrated families
        return policy.fallback, "posttrain default for small models outside the cookbook's table"
    return lr * policy.factor, f"tinker_cookbook.hyperparam_utils.get_lr {policy.why}".strip()
