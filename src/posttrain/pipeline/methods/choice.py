"""Choosing the recipe (the user guide's "Choosing a Recipe"), and the default learning rate, from the registry.

`task=auto`: the first method (in registry order) whose own choosing settings are given (a teacher means
distillation, a system prompt prompt distillation, a grader rubric RL, `env=` RL, a preference model pairwise
RL), preferring one that takes every setting given (a grader with a preference model is pairwise RL's judge);
else the first that trains on the data's format; no data at all means the default SFT data. Once the method is
known, a setting given that it does not take is refused in one line naming both (`check_method_settings`).
"""

from __future__ import annotations

import functools
from typing import Any

import chz

from posttrain.config.run import RunSettings
from posttrain.errors import ConfigError
from posttrain.pipeline.data import LoadedData
from posttrain.pipeline.methods import METHODS, config_class


def choose_task(cfg: Any, data: LoadedData | None) -> tuple[str, str]:
    """(the method, why). With task= given, that one; either way, its settings are then checked against it."""
    if cfg.task != "auto":
        return cfg.task, "task= given"
    task, why = _auto(cfg, data)
    check_method_settings(cfg, task)
    return task, why


def _auto(cfg: RunSettings, data: LoadedData | None) -> tuple[str, str]:
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


def given(cfg: RunSettings) -> list[str]:
    """The settings that differ from their defaults."""
    defaults = _defaults(type(cfg))
    return [name for name in chz.chz_fields(type(cfg)) if getattr(cfg, name) != getattr(defaults, name)]


@functools.cache
def _defaults(cls: type) -> Any:
    return cls()


def check_method_settings(cfg: RunSettings, task: str) -> None:
    """A setting given that the method does not take is refused: it would be accepted and ignored. Then what the
    method itself requires of its settings (its config's `when_chosen`)."""
    cls = config_class(task)
    accepted = set(chz.chz_fields(cls)) | {"task"}
    for name in given(cfg):
        if name not in accepted:
            owners = [m for m in METHODS if name in chz.chz_fields(config_class(m))]
            if len(owners) == 1:
                raise ConfigError(f"{name} is only used by task={owners[0]}, not task={task}; leave it out")
            raise ConfigError(
                f"{name} is not used by task={task} (only by task={', '.join(owners)}); leave it out"
            )
    when_chosen = getattr(cls, "when_chosen", None)
    if when_chosen is not None:
        when_chosen(cfg)


def default_learning_rate(model_name: str, task: str) -> tuple[float, str]:
    """(the rate, where it comes from): the cookbook's calibration for the model, scaled by the method's policy."""
    from tinker_cookbook.hyperparam_utils import get_lr

    policy = METHODS[task].learning_rate
    try:
        lr = get_lr(model_name)
    except Exception:  # noqa: BLE001 - models outside the cookbook's calibrated families
        return policy.fallback, "posttrain default for small models outside the cookbook's table"
    return lr * policy.factor, f"tinker_cookbook.hyperparam_utils.get_lr {policy.why}".strip()
