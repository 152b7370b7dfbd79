"""The settings of task=distillation, and what `teacher_model=A,B dataset=a,b` means: one prompt dataset per
teacher, in the same order, as the cookbook's multi-teacher recipe (recipes/distillation/on_policy_multi_teacher.py)
pairs them."""

from __future__ import annotations

from typing import Any, Literal

import chz

from posttrain.config.checks import not_blank
from posttrain.config.run import RunSettings
from posttrain.errors import ConfigError
from posttrain.pipeline.data.sources import PER_DATASET_OPTIONS, teacher_models
from posttrain.pipeline.envs.settings import ProblemSettings
from posttrain.pipeline.methods.options import EvalSamplingOptions, RolloutOptions, TemperatureOptions
from posttrain.pipeline.methods.sft import SupervisedOptions

DistillationMode = Literal["off_policy", "on_policy"]


@chz.chz
class DistillationOptions:
    teacher_model: str | None = chz.field(
        default=None,
        doc="distillation: the teacher, a model the backend serves or a tinker:// checkpoint path; several teachers "
        "comma-separated, each with its own prompt dataset (dataset=a,b in the same order)",
    )
    distillation_mode: DistillationMode | None = chz.field(
        default=None, doc="distillation: off_policy|on_policy (None: off_policy)"
    )

    @staticmethod
    def check(cfg: Any) -> None:
        not_blank(cfg, "teacher_model")
        check_teachers(cfg)


@chz.chz
class DistillationConfig(
    RunSettings,
    SupervisedOptions,
    EvalSamplingOptions,
    TemperatureOptions,
    RolloutOptions,
    ProblemSettings,
    DistillationOptions,
):
    """Every setting of task=distillation (the rollout options: on-policy; env=: prompts from an environment)."""

    @staticmethod
    def when_chosen(cfg: Any) -> None:
        if cfg.teacher_model is None:
            raise ConfigError(
                "task=distillation needs teacher_model= (a model the backend serves or a tinker:// checkpoint)"
            )
        mode = cfg.distillation_mode or "off_policy"
        other = "on_policy" if mode == "off_policy" else "off_policy"
        defaults = chz.chz_fields(DistillationConfig)
        for name in MODE_SETTINGS[other]:
            if getattr(cfg, name) != defaults[name]._default:
                raise ConfigError(
                    f"{name} is only used by distillation_mode={other}, not distillation_mode={mode}; leave it out"
                )


# The settings only one mode's cookbook loop takes: off-policy is `supervised.train`, on-policy `train_on_policy`.
MODE_SETTINGS = {
    "off_policy": ("lr_schedule", "adam_beta1", "adam_beta2", "adam_eps"),
    "on_policy": ("group_size", "loss_fn", "kl_penalty_coef", "kl_discount_factor", "num_substeps"),
}


# --- distillation with several teachers ---------------------------------------------------------------------
# The cookbook's multi-teacher recipe (recipes/distillation/on_policy_multi_teacher.py) pairs each prompt
# dataset with its own teacher. Here: teacher_model=A,B with dataset=a,b, in the same order.


def check_teachers(cfg: Any) -> None:
    """One-line ConfigError naming the option when the teachers, or the datasets that go with them, do not
    fit: an empty or repeated name, a dataset count that differs, an option with neither one value nor one per
    dataset, a share of the batch or of the row limits that would be empty."""
    teachers = teacher_models(cfg)
    if not teachers:
        return
    if not all(teachers):
        raise ConfigError(
            f"teacher_model={cfg.teacher_model!r} has an empty name; give the teachers comma-separated, "
            "e.g. teacher_model=A,B"
        )
    repeated = next((t for i, t in enumerate(teachers) if t in teachers[:i]), None)
    if repeated is not None:
        raise ConfigError(
            f"teacher_model names {repeated} twice; give each teacher once, each with its own dataset"
        )
    n = len(teachers)
    if n < 2:
        return
    several = f"teacher_model names {n} teachers"
    if cfg.env is not None:
        raise ConfigError(
            f"{several}: their prompts come from dataset= (one per teacher, comma-separated), not env=; "
            "leave env out"
        )
    if cfg.dataset is None:
        raise ConfigError(
            f"{several}: give one prompt dataset per teacher, in the same order (dataset=a.jsonl,b.jsonl)"
        )
    datasets = [d.strip() for d in cfg.dataset.split(",")]
    if len(datasets) != n:
        raise ConfigError(
            f"{several} but dataset names {len(datasets)}; give one dataset per teacher, in the same order"
        )
    if not all(datasets):
        raise ConfigError(f"dataset={cfg.dataset!r} has an empty name; give one dataset per teacher")
    for name in PER_DATASET_OPTIONS:
        value = getattr(cfg, name)
        if value is None:
            continue
        parts = [part.strip() for part in value.split(",")]
        # One held-out set for every teacher would score each on the others' prompts.
        allowed = (n,) if name == "eval_dataset" else (1, n)
        if len(parts) not in allowed or not all(parts):
            one = "" if name == "eval_dataset" else "one value for all or "
            raise ConfigError(
                f"{name}={value!r} does not fit the {n} datasets; give {one}one per dataset, comma-separated"
            )
    for name in ("max_train_rows", "max_eval_rows"):
        if getattr(cfg, name) < n:
            raise ConfigError(
                f"{name}={getattr(cfg, name)} is fewer than the {n} datasets (each gets an equal share)"
            )
    if cfg.distillation_mode == "on_policy" and cfg.batch_size < n:
        raise ConfigError(
            f"batch_size={cfg.batch_size} is fewer than the {n} teachers: on-policy, every step takes "
            "batch_size prompts, shared out among the teachers' datasets (at least one each)"
        )
