"""A sweep's grid: its own settings, its axes (settings given a list of values, and seeds=), the settings every
run shares, and each point checked as `posttrain train` checks a run, before anything starts."""

from __future__ import annotations

import hashlib
import itertools
import re
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import chz

from posttrain.config.parse import parse_args, setting_key
from posttrain.errors import ConfigError
from posttrain.pipeline.settings import TrainConfig, parse_train_args

# More runs than this need yes=true: a typo in a value list should not start a day of training.
GRID_LIMIT = 12
# The sweep names each run's folder and data; these would fight it.
OWNED = ("run_name", "results_dir", "resume", "dataset_config", "dataset_split", "eval_split", "eval_dataset")


@chz.chz
class SweepSettings:
    """posttrain sweep: a grid of train runs (KEY=V1,V2,... for any numeric, boolean or choice setting), one
    results folder each, the best setting chosen on validation rows and reported once on held-out test rows.

    Every other key=value is a train setting shared by all runs (`posttrain train --help`)."""

    seeds: int = chz.field(
        default=1, doc="runs per setting, seeds seed, seed+1, ... (the spread per setting)"
    )
    name: str | None = chz.field(
        default=None,
        doc="the sweep's folder in out (default: from its settings, so the "
        "same command continues the same sweep)",
    )
    out: str = chz.field(default="sweeps", doc="where sweeps are kept")
    yes: bool = chz.field(default=False, doc=f"run a grid of more than {GRID_LIMIT} runs")
    parallel: int = chz.field(default=4, doc="runs at once on Tinker (the local engine runs one at a time)")
    dry_run: bool = chz.field(default=False, doc="the plan of the whole grid only")


@dataclass(frozen=True)
class Point:
    """One run of the grid: its settings (axis -> value as given) and its folder's name."""

    number: int
    values: tuple[tuple[str, str], ...]

    @property
    def id(self) -> str:
        # A run name takes letters, digits, '.', '_' and '-' only.
        return re.sub(
            r"[^A-Za-z0-9._-]", "_", f"{self.number:02d}-" + "-".join(f"{k}_{v}" for k, v in self.values)
        )

    @property
    def setting(self) -> tuple[tuple[str, str], ...]:
        """What the point sets, without its seed: the setting its seeds share."""
        return tuple((k, v) for k, v in self.values if k != "seed")

    def argv(self) -> list[str]:
        return [f"{k}={v}" for k, v in self.values]


@dataclass(frozen=True)
class Grid:
    axes: dict[str, list[str]]
    shared: list[str]  # the train settings every run gets
    points: list[Point]
    folder: Path

    @property
    def data(self) -> Path:
        return self.folder / "data"

    def results_dir(self, point: Point) -> Path:
        return self.folder / "runs" / point.id


def parse_grid(argv: list[str]) -> tuple[SweepSettings, Grid]:
    """The sweep's own settings, its axes and the settings shared by every run; each point checked as `train`
    checks a run, before anything starts."""
    own_keys = set(chz.chz_fields(SweepSettings))
    own = [a for a in argv if setting_key(a) in own_keys or setting_key(a) in ("help", "h")]
    rest = [a for a in argv if a not in own]
    settings = parse_args(SweepSettings, own)
    if settings.seeds < 1:
        raise ConfigError(f"seeds={settings.seeds}: must be at least 1")
    if settings.parallel < 1:
        raise ConfigError(f"parallel={settings.parallel}: must be at least 1")
    if owned := [setting_key(a) for a in rest if setting_key(a) in OWNED]:
        raise ConfigError(
            f"{owned[0]}= is the sweep's own (each run gets its folder and its part of the data); leave it out"
        )
    axes, shared = _axes(rest, settings.seeds)
    points = [
        Point(n, tuple(zip(axes, values, strict=True)))
        for n, values in enumerate(itertools.product(*axes.values()), 1)
    ]
    if len(points) > GRID_LIMIT and not settings.yes:
        raise ConfigError(
            f"the grid has {len(points)} runs, more than {GRID_LIMIT}; add yes=true to run them all"
        )
    for point in points:
        cfg = parse_train_args([*shared, *point.argv()])
    if cfg.dataset is None and cfg.env:
        raise ConfigError(
            f"env={cfg.env} generates its problems: a sweep chooses on validation rows held apart from its test rows, "
            "which needs the problems as a dataset (dataset=FILE of question/answer rows)"
        )
    name = (
        settings.name
        or "sweep-"
        + hashlib.blake2b(repr((sorted(axes.items()), sorted(shared))).encode(), digest_size=4).hexdigest()
    )
    return settings, Grid(axes, shared, points, Path(settings.out) / name)


def _axes(rest: list[str], seeds: int) -> tuple[dict[str, list[str]], list[str]]:
    """Settings given a list of values (a numeric, boolean or choice setting with commas) and seeds= as axes."""
    fields = chz.chz_fields(TrainConfig)
    axes: dict[str, list[str]] = {}
    shared = []
    for arg in rest:
        key, value = setting_key(arg), arg.partition("=")[2]
        if key in fields and "," in value and not _takes_text(fields[key].final_type):
            values = [v.strip() for v in value.split(",")]
            if not any(values):
                raise ConfigError(f"{key}={value}: an empty list of values; give them as {key}=V1,V2")
            if "" in values or len(set(values)) < len(values):
                raise ConfigError(f"{key}={value}: an empty or repeated value in the list")
            axes[key] = values
        else:
            shared.append(arg)
    if seeds > 1:
        if "seed" in axes:
            raise ConfigError("seed= is a list and seeds= is given: give one of them")
        start = _given_seed(shared)
        shared = [a for a in shared if setting_key(a) != "seed"]
        axes["seed"] = [str(start + k) for k in range(seeds)]
    if not axes:
        raise ConfigError(
            "nothing to sweep: give a setting a list of values (learning_rate=1e-4,3e-4) or seeds=N"
        )
    return axes, shared


def _given_seed(shared: list[str]) -> int:
    """The first of seeds= seeds: seed= as given (the last one), else 0."""
    values = [a.partition("=")[2].strip() for a in shared if setting_key(a) == "seed"]
    if not values:
        return 0
    try:
        return int(values[-1])
    except ValueError:
        raise ConfigError(f"seed={values[-1]}: not an integer (e.g. seed=0)") from None


def _takes_text(tp: Any) -> bool:
    """Whether a setting's type holds free text (its commas are part of a value, e.g. env=...:a=1,b=2)."""
    args = (
        typing.get_args(tp)
        if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union
        else (tp,)
    )
    return any(arg is str for arg in args)
