"""Checks of setting values: each names the option and what it takes, in one line (a `ConfigError`)."""

from __future__ import annotations

import math
import typing
from typing import Any, Literal

from posttrain.errors import ConfigError


def choices(tp: Any) -> tuple[str, ...]:
    """The values of a Literal type (or of the Literal inside `X | None`)."""
    for arg in (tp, *typing.get_args(tp)):
        if typing.get_origin(arg) is Literal:
            return typing.get_args(arg)
    return ()


def choice(name: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"{name}={value!r} is not valid; allowed values: {', '.join(allowed)}")


def at_least(name: str, value: Any, low: float, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not math.isfinite(value)
        or value < low
    ):
        raise ConfigError(f"{name}={value!r} is not valid; expected a number >= {low:g}")


def whole_number(name: str, value: Any, low: int, why: str = "", allow_none: bool = False) -> None:
    """An integer setting (a count of steps, rollouts): not a bool, not a float, at least `low`."""
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ConfigError(f"{name}={value!r} is not valid; expected an integer >= {low}{why}")


def between(name: str, value: Any, low: float, high: float) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not (low <= value <= high):
        raise ConfigError(f"{name}={value!r} is not valid; expected a number from {low:g} to {high:g}")


def not_blank(cfg: Any, *names: str) -> None:
    """Optional text settings given as blanks are mistakes (`dataset= `), not "leave it out"."""
    for name in names:
        value = getattr(cfg, name)
        if value is not None and not value.strip():
            raise ConfigError(f"{name} is empty; give a value or leave it out")


def literals(cfg: Any, cls: type) -> None:
    """Every Literal-typed setting of `cls` holds one of its values (chz checks argv; this checks any object)."""
    for name, tp in typing.get_type_hints(cls).items():
        allowed, value = choices(tp), getattr(cfg, name, None)
        if allowed and value is not None:
            choice(name, value, allowed)
