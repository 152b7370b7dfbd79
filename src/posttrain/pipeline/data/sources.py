"""What a run loads: `dataset=` (or the default chat data) as one source, or with several distillation teachers
one dataset per teacher (`teacher_model=A,B dataset=a,b`, the cookbook's multi-teacher recipe, recipes/distillation/
on_policy_multi_teacher.py), each with its own options; then each loaded and split (`load.load_data`)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from posttrain.config.run import RunSettings
from posttrain.pipeline.data.load import DataRequest, LoadedData, load_data
from posttrain.util import PACKAGE_DATA

DEFAULT_SFT_DATA = PACKAGE_DATA / "default_sft.jsonl"
# The user's guide samples and splits with seed 42; `seed=` moves it, so seed=0 (the default) splits as the guide.
SPLIT_SEED = 42

# Data options that take one value for every dataset or one per dataset (comma-separated, in order).
PER_DATASET_OPTIONS = ("dataset_config", "dataset_split", "eval_dataset", "eval_split")


def teacher_models(cfg: RunSettings) -> list[str]:
    """The teachers teacher_model= names (comma-separated), in order; [] without one."""
    if cfg.teacher_model is None:
        return []
    return [name.strip() for name in cfg.teacher_model.split(",")]


@dataclass(frozen=True)
class DataSource:
    """One dataset to load, with its own options (pipeline.data.load_data's arguments)."""

    dataset: str | None
    dataset_config: str | None
    dataset_split: str
    eval_dataset: str | None
    eval_split: str | None
    max_train_rows: int
    max_eval_rows: int


def data_sources(cfg: RunSettings) -> list[DataSource]:
    """The datasets a run loads: `dataset=` as given; with several teachers one per teacher, where each
    per-dataset option is one value for all or one per dataset, and the row limits are shared out equally
    (the run as a whole keeps to max_train_rows / max_eval_rows)."""
    n = len(teacher_models(cfg))
    if n < 2:
        return [
            DataSource(
                cfg.dataset,
                cfg.dataset_config,
                cfg.dataset_split,
                cfg.eval_dataset,
                cfg.eval_split,
                cfg.max_train_rows,
                cfg.max_eval_rows,
            )
        ]
    assert cfg.dataset is not None  # check_teachers guarantees one dataset per teacher
    options = {name: _per_dataset(getattr(cfg, name), n) for name in PER_DATASET_OPTIONS}
    return [
        DataSource(
            dataset.strip(),
            options["dataset_config"][i],
            options["dataset_split"][i] or "train",
            options["eval_dataset"][i],
            options["eval_split"][i],
            cfg.max_train_rows // n,
            cfg.max_eval_rows // n,
        )
        for i, dataset in enumerate(cfg.dataset.split(","))
    ]


def _per_dataset(value: str | None, n: int) -> list[str | None]:
    if value is None:
        return [None] * n
    parts = [part.strip() for part in value.split(",")]
    return parts * n if len(parts) == 1 else list(parts)


def load_run_data(cfg: RunSettings, for_training: bool = True) -> LoadedData | None:
    """The run's data (`dataset=`, or the default chat data; None where an environment makes its problems)."""
    if cfg.dataset is None and cfg.env:
        return None  # the environment generates its own problems
    # One dataset; with several distillation teachers, one per teacher (the first carries the others).
    sources = data_sources(cfg)
    loaded = []
    for source in sources:
        request = DataRequest(
            source.dataset or str(DEFAULT_SFT_DATA),
            source.dataset_config,
            source.dataset_split,
            source.eval_dataset,
            source.eval_split,
            source.max_train_rows,
            source.max_eval_rows,
            seed=SPLIT_SEED + cfg.seed,
            for_training=for_training,
        )
        loaded.append(load_data(request))
    return dataclasses.replace(loaded[0], others=tuple(loaded[1:])) if len(loaded) > 1 else loaded[0]
