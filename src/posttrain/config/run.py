"""The settings every run takes, whatever its training method: the data, the model, where it runs and where its
results go, the optimisation every cookbook loop shares, tracking. A method's own settings are declared with the
method (`pipeline.methods.*`, beside the cookbook Config each drives)."""

from __future__ import annotations

import re
from typing import Literal

import chz

from posttrain.config.checks import at_least, between, literals, not_blank
from posttrain.errors import ConfigError

Backend = Literal["auto", "tinker", "local"]
# What the local engine accepts (posttrain.engine.models.choose_dtype).
EngineDtype = Literal["auto", "bf16", "fp32"]
# The user guide's hard dataset limits.
MAX_TRAIN_ROWS_LIMIT = 20_000
MAX_EVAL_ROWS_LIMIT = 2_000
# num_epochs and batch_size when not given and the data does not call for others (`pipeline.methods.length`).
DEFAULT_EPOCHS = 1
DEFAULT_BATCH_SIZE = 32
_RUN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


@chz.chz
class RunSettings:
    """posttrain: LoRA fine-tuning through the Tinker API (or the bundled local engine)."""

    # What to train on
    dataset: str | None = chz.field(
        default=None,
        doc="local file (jsonl/json/csv/parquet) or HF dataset name; None = embedded default data "
        "(distillation with several teachers: one per teacher, comma-separated)",
    )
    dataset_config: str | None = chz.field(default=None, doc="HF dataset config (subset) name")
    dataset_split: str = chz.field(default="train", doc="split to train on")
    eval_dataset: str | None = chz.field(default=None, doc="separate evaluation data (file or HF dataset)")
    eval_split: str | None = chz.field(
        default=None, doc="evaluation split (None: test split or a held-out 10%)"
    )
    max_train_rows: int = chz.field(
        default=20_000, doc=f"training rows used (at most {MAX_TRAIN_ROWS_LIMIT})"
    )
    max_eval_rows: int = chz.field(default=2_000, doc=f"evaluation rows used (at most {MAX_EVAL_ROWS_LIMIT})")
    model_name: str = chz.field(default="HuggingFaceTB/SmolLM2-135M-Instruct", doc="base model")
    renderer_name: str | None = chz.field(default=None, doc="chat renderer (None: recommended for the model)")

    # Where it runs and where results go
    backend: Backend = chz.field(default="auto", doc="auto|tinker|local")
    base_url: str | None = chz.field(default=None, doc="Tinker service URL (None: the default service)")
    run_name: str | None = chz.field(
        default=None, doc="run name (None: generated); logs in results/logs/<run_name>"
    )
    results_dir: str = chz.field(default="results", doc="results folder")
    dtype: EngineDtype = chz.field(default="auto", doc="local engine compute dtype: auto|bf16|fp32")

    # The optimisation every cookbook loop shares
    learning_rate: float | None = chz.field(
        default=None, doc="peak learning rate (None: recommended for the model)"
    )
    # None (not given): chosen from the data size and the method (`pipeline.methods.length`), which records why;
    # the munger makes the value read everywhere else the number used, and X_num_epochs says whether it was given.
    num_epochs: int = chz.field(
        default=None,
        munger=lambda _, value: DEFAULT_EPOCHS if value is None else value,
        doc="passes over the training data (not given: enough for the method's minimum steps on small data, at most 4)",
    )
    max_steps: int | None = chz.field(
        default=None, doc="cap on training steps (None: num_epochs over the data)"
    )
    batch_size: int = chz.field(
        default=None,
        munger=lambda _, value: DEFAULT_BATCH_SIZE if value is None else value,
        doc=f"examples (SFT) or problems (RL) per step (not given: {DEFAULT_BATCH_SIZE}, or at most 1/8 of a small "
        "dataset's training rows)",
    )
    lora_rank: int = chz.field(default=32, doc="LoRA rank")
    seed: int = chz.field(
        default=0,
        doc="the run's one seed: LoRA initialisation (local engine), training order, the held-out split (42 + seed, "
        "so the default splits as the user guide does), generated problems, evaluation and rollout sampling",
    )
    eval_concurrency: int = chz.field(default=64, doc="concurrent evaluation requests")

    load_checkpoint_path: str | None = chz.field(
        default=None,
        doc="start training from this saved state (tinker://.../weights/NAME, e.g. an earlier run's); the "
        "baseline is still the base model",
    )

    # Did training break something else: both models are also scored on data the run does not train on.
    guard: bool = chz.field(
        default=True,
        doc="guard evaluation: base and trained model also scored on a general chat set the run did not train on "
        "(and, per method, the answers' task score and length); the verdict says if it REGRESSED",
    )
    guard_dataset: str | None = chz.field(
        default=None,
        doc='your own guard set: a JSONL file of conversations ({"messages": [...]}, the last assistant reply is '
        "scored); None: 64 everyday conversations shipped with tinker-cookbook",
    )

    # Tracking, checkpoints and the run itself
    wandb_project: str | None = chz.field(default=None, doc="W&B project (None: WANDB_PROJECT from .env)")
    wandb_name: str | None = chz.field(default=None, doc="W&B run name (None: the run name)")
    save_every: int = chz.field(default=20, doc="checkpoint every N steps (0: only the final one)")
    eval_every: int = chz.field(default=10, doc="evaluate every N steps during training (0: never)")
    dry_run: bool = chz.field(
        default=False,
        doc="check everything, then print the plan (sizes, tokens, Tinker cost or local time) and stop",
    )
    resume: bool = chz.field(
        default=False,
        doc="continue the stopped run named run_name from its last checkpoint, in the same log directory",
    )
    verbose: bool = chz.field(
        default=False, doc="show every library's output (else it goes to results/logs/<run>/console.log)"
    )


def check_run(cfg: RunSettings) -> None:
    """The run's own settings: enumerations, ranges, names; a one-line ConfigError on the first problem."""
    literals(cfg, RunSettings)
    not_blank(
        cfg,
        "dataset",
        "dataset_config",
        "eval_dataset",
        "eval_split",
        "renderer_name",
        "wandb_project",
        "wandb_name",
        "guard_dataset",
    )
    for name in ("dataset_split", "model_name", "results_dir"):
        if not getattr(cfg, name).strip():
            raise ConfigError(f"{name} is empty; give a value")
    _check_names(cfg)
    _check_numbers(cfg)


def _check_names(cfg: RunSettings) -> None:
    if cfg.run_name is not None and (not _RUN_NAME.match(cfg.run_name) or ".." in cfg.run_name):
        raise ConfigError(
            f"run_name={cfg.run_name!r} is not valid; use letters, digits, '.', '_' and '-' (it names the folder "
            "results/logs/<run_name>)"
        )
    if cfg.resume and cfg.dry_run:
        raise ConfigError(
            "resume=true and dry_run=true do not go together: a plan is made before a run starts"
        )
    if cfg.resume and not cfg.run_name:
        raise ConfigError(
            "resume=true needs run_name=<the run to continue> (its logs are results/logs/<run_name>)"
        )
    if cfg.base_url is not None and not cfg.base_url.startswith(("http://", "https://")):
        raise ConfigError(f"base_url={cfg.base_url!r} is not valid; expected an http:// or https:// URL")
    if cfg.load_checkpoint_path is not None and not cfg.load_checkpoint_path.startswith("tinker://"):
        raise ConfigError(
            f"load_checkpoint_path={cfg.load_checkpoint_path!r} is not valid; expected a saved state, "
            "tinker://<run>/weights/<name> (an earlier run's checkpoints.jsonl lists them as state_path)"
        )
    if cfg.load_checkpoint_path is not None and cfg.resume:
        raise ConfigError(
            "resume=true continues from the run's own last checkpoint; leave load_checkpoint_path out"
        )
    if cfg.guard_dataset is not None and not cfg.guard:
        raise ConfigError(
            "guard_dataset= is a guard set, and guard=false turns the guard off; give one or the other"
        )
    if cfg.wandb_project is not None and "/" in cfg.wandb_project:
        raise ConfigError(f"wandb_project={cfg.wandb_project!r} is not valid; a W&B project name has no '/'")


def _check_numbers(cfg: RunSettings) -> None:
    if cfg.learning_rate is not None and not (
        isinstance(cfg.learning_rate, int | float) and 0 < cfg.learning_rate < 1
    ):
        raise ConfigError(f"learning_rate={cfg.learning_rate!r} is not valid; expected a number in (0, 1)")
    at_least("num_epochs", cfg.num_epochs, 1)
    at_least("max_steps", cfg.max_steps, 1, allow_none=True)
    at_least("batch_size", cfg.batch_size, 1)
    at_least("lora_rank", cfg.lora_rank, 1)
    between("max_train_rows", cfg.max_train_rows, 1, MAX_TRAIN_ROWS_LIMIT)
    between("max_eval_rows", cfg.max_eval_rows, 1, MAX_EVAL_ROWS_LIMIT)
    at_least("eval_concurrency", cfg.eval_concurrency, 1)
    at_least("seed", cfg.seed, 0)
    at_least("save_every", cfg.save_every, 0)
    at_least("eval_every", cfg.eval_every, 0)
