"""The run configuration: one `TrainConfig` (a chz class), parsed from `key=value` arguments.

Public API
----------
- `TrainConfig` -- every setting a run accepts, with its default.
- `parse_train_args(argv) -> TrainConfig` -- parses `key=value` arguments (a leading `--` is tolerated,
  `--key=value` == `key=value`) with chz, then `validate()`s the result.
- `validate(cfg) -> None` -- checks enumerated values and ranges; raises `ConfigError` (one line, naming
  the option and the allowed values).
- `config_to_dict(cfg) -> dict` -- every field and its value (JSON-serializable), for summary.json.
- `HelpRequested` -- raised by `parse_train_args` when `--help`/`-h`/`help` is in argv. It is NOT a
  `UserError`: the CLI should print `exc.text` to stdout and exit with `exc.exit_code` (0).

Unsupported settings
--------------------
Anything that is not a `TrainConfig` field is rejected -- the keys people reach for when they want a setting
Tinker does not expose (PPO clip epsilon, GAE lambda, dynamic batch size, optimizer choice, gradient
clipping, warmup, mixed precision, model parallelism; see `UNSUPPORTED_SETTINGS`) and any other unknown
key alike -- and so is an `lr_schedule` outside the cookbook's `LRSchedule`. The error is an `UnsupportedConfigError`
(a `ConfigError`) whose message is the product's fixed sentence `UNSUPPORTED_SENTENCE`, then on the same
line ` Unsupported: <keys>. Supported parameters: <sorted field names>.`
"""

from __future__ import annotations

import math
import re
import types
import typing
from dataclasses import dataclass
from typing import Any, Literal

import chz
from chz.blueprint import (
    ConstructionException,
    EntrypointHelpException,
    ExtraneousBlueprintArg,
    InvalidBlueprintArg,
    MissingBlueprintArg,
)
from tinker_cookbook.utils.lr_scheduling import LRSchedule

from posttrain.errors import ConfigError

UNSUPPORTED_SENTENCE = (
    "This configuration is not currently available in the Tinker training configs. "
    "The available parameters are listed in the Config classes. "
    "Let me know if you'd like to proceed with the supported options."
)

# Enumerated settings: one Literal each, the allowed values read from it (`choices`). Where the cookbook has the
# type, it is the cookbook's; tests pin the others to the cookbook's (a subset where the local engine or the
# product supports fewer).
TaskName = Literal[
    "auto", "sft", "rl", "dpo", "rlhf", "distillation", "prompt_distillation", "rubric"
]  # the method registry (pipeline/methods) plus auto
DistillationMode = Literal["off_policy", "on_policy"]
# How a rubric grader turns its answer into a score (pipeline/rubric.py).
GraderMode = Literal["probability", "sampled"]
Backend = Literal["auto", "tinker", "local"]
# The RL losses both Tinker and the local engine implement (a subset of tinker.types.LossFnType).
RLLossFn = Literal["importance_sampling", "ppo", "cispo", "dro"]
# tinker_cookbook.renderers.TrainOnWhat values, minus CUSTOMIZED (needs per-token weights we never build);
# spelled out because importing the renderers pulls in torch, and settings are checked before that.
TrainOnWhatName = Literal[
    "last_assistant_message",
    "last_assistant_turn",
    "all_assistant_messages",
    "all_messages",
    "all_tokens",
    "all_user_and_system_messages",
]
# What the local engine accepts (posttrain.engine.models.choose_dtype).
EngineDtype = Literal["auto", "bf16", "fp32"]
RL_ENVS = (
    "math", "arithmetic", "reasoning_gym:TASK", "code", "code:humaneval", "game:guess_number", "game:tic_tac_toe",
    "tools:calculator", "tools:search",
)  # fmt: skip
GAMES = ("guess_number", "tic_tac_toe")
TOOL_ENVS = ("calculator", "search")  # `tools:NAME` or `tools:NAME:max_turns=N`
# env=game:tic_tac_toe's fixed opponent (pipeline.tictactoe): a random free cell (seeded); win-or-block, else
# random; minimax (the cookbook's OptimalOpponent, unbeatable).
GameOpponent = Literal["random", "blocker", "optimal"]


def choices(tp: Any) -> tuple[str, ...]:
    """The values of a Literal type (or of the Literal inside `X | None`)."""
    for arg in (tp, *typing.get_args(tp)):
        if typing.get_origin(arg) is Literal:
            return typing.get_args(arg)
    return ()


# What chz raises for arguments it cannot turn into a TrainConfig.
_CHZ_ERRORS = (
    ConstructionException,
    ExtraneousBlueprintArg,
    InvalidBlueprintArg,
    MissingBlueprintArg,
    ValueError,
    TypeError,
)

# The spec's hard dataset limits.
MAX_TRAIN_ROWS_LIMIT = 20_000
MAX_EVAL_ROWS_LIMIT = 2_000

# Keys people use for settings the Tinker training configs do not expose, by category. Every unknown key is
# rejected; these are listed so the rejection can also say what the setting is (`unsupported_category`).
UNSUPPORTED_SETTINGS: dict[str, str] = {
    **dict.fromkeys(
        ("clip_epsilon", "ppo_clip", "ppo_clip_epsilon", "clip_range", "cliprange", "clip_ratio", "epsilon"),
        "custom PPO clipping (epsilon is fixed internally)",
    ),
    **dict.fromkeys(("gae_lambda", "lam", "lambda_", "gae"), "custom GAE lambda"),
    **dict.fromkeys(
        ("dynamic_batch_size", "dynamic_batching", "auto_batch_size", "adaptive_batch_size"),
        "dynamic batch sizing during training",
    ),
    **dict.fromkeys(
        ("optimizer", "optim", "optimizer_type", "optimizer_name"), "optimizer choice (only Adam)"
    ),
    **dict.fromkeys(
        (
            "grad_clip",
            "max_grad_norm",
            "gradient_clipping",
            "grad_clip_norm",
            "clip_grad_norm",
            "grad_norm_clip",
        ),
        "gradient clipping",
    ),
    **dict.fromkeys(
        ("warmup_steps", "warmup_ratio", "warmup", "lr_warmup_steps", "num_warmup_steps", "warmup_fraction"),
        "learning-rate warmup",
    ),
    **dict.fromkeys(
        ("mixed_precision", "fp16", "bf16", "precision", "amp", "half_precision"), "mixed precision"
    ),
    **dict.fromkeys(
        (
            "tensor_parallel",
            "tensor_parallel_size",
            "tp_size",
            "tp",
            "pipeline_parallel",
            "pipeline_parallel_size",
            "pp_size",
            "model_parallel",
            "fsdp",
            "deepspeed",
            "zero_stage",
        ),
        "model parallelism",
    ),
}


class HelpRequested(Exception):
    """`--help` was asked for: print `.text` (to stdout) and exit with `.exit_code` (0). Not an error."""

    exit_code = 0

    def __init__(self, text: str):
        super().__init__(text)
        self.text = text


class UnsupportedConfigError(ConfigError):
    """A setting the Tinker training configs do not expose. `.keys` holds the offending key(s)."""

    def __init__(self, keys: list[str]):
        self.keys = list(keys)
        described = [f"{k} ({c})" if (c := unsupported_category(k)) else k for k in self.keys]
        super().__init__(
            f"{UNSUPPORTED_SENTENCE} Unsupported: {', '.join(described)}. "
            f"Supported parameters: {', '.join(supported_parameters())}."
        )


@chz.chz
class TrainConfig:
    """posttrain: LoRA fine-tuning through the Tinker API (or the bundled local engine)."""

    # What to train and on what
    task: TaskName = chz.field(
        default="auto",
        doc="|".join(choices(TaskName)) + " (auto: inferred from the data and settings)",
    )
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
    model_name: str = chz.field(default="HuggingFaceTB/SmolLM2-135M-Instruct", doc="base model")
    renderer_name: str | None = chz.field(default=None, doc="chat renderer (None: recommended for the model)")

    # Where it runs and where results go
    backend: Backend = chz.field(default="auto", doc="auto|tinker|local")
    base_url: str | None = chz.field(default=None, doc="Tinker service URL (None: the default service)")
    run_name: str | None = chz.field(
        default=None, doc="run name (None: generated); logs in results/logs/<run_name>"
    )
    results_dir: str = chz.field(default="results", doc="results folder")

    # Optimisation
    learning_rate: float | None = chz.field(
        default=None, doc="peak learning rate (None: recommended for the model)"
    )
    lr_schedule: LRSchedule = chz.field(default="linear", doc="linear|cosine|constant")
    num_epochs: int = chz.field(default=1, doc="passes over the training data")
    max_steps: int | None = chz.field(
        default=None, doc="cap on training steps (None: num_epochs over the data)"
    )
    batch_size: int = chz.field(default=32, doc="examples (SFT) or problems (RL) per step")
    lora_rank: int = chz.field(default=32, doc="LoRA rank")
    max_length: int = chz.field(default=2048, doc="max tokens per training example")
    train_on_what: TrainOnWhatName | None = chz.field(
        default=None,
        doc="SFT loss tokens: " + "|".join(choices(TrainOnWhatName)) + " (None: chosen from the data)",
    )
    max_train_rows: int = chz.field(
        default=20_000, doc=f"training rows used (at most {MAX_TRAIN_ROWS_LIMIT})"
    )
    max_eval_rows: int = chz.field(default=2_000, doc=f"evaluation rows used (at most {MAX_EVAL_ROWS_LIMIT})")
    eval_concurrency: int = chz.field(default=64, doc="concurrent evaluation requests")
    seed: int = chz.field(
        default=0,
        doc="random seed (training order, generated RL problems, sampling); data shuffling and the "
        "held-out split use 42, as the user guide does",
    )

    # RL
    env: str | None = chz.field(default=None, doc="RL environment: " + "|".join(RL_ENVS) + " (tools: add :max_turns=N)"
    )
    game_opponent: GameOpponent | None = chz.field(
        default=None, doc="env=game:tic_tac_toe: the fixed opponent, random|blocker|optimal (None: random)"
    )
    reward_fn: str | None = chz.field(
        default=None,
        doc="RL: your own verifier, path/to/file.py:function (gets the problem row and the completion, returns a float)",
    )
    verifier_timeout: float = chz.field(
        default=10.0, doc="RL: seconds one reward_fn call may take; a slower call is stopped and scores 0"
    )
    group_size: int = chz.field(default=8, doc="RL rollouts per problem")
    max_tokens: int = chz.field(default=256, doc="max sampled tokens per completion")
    temperature: float = chz.field(default=1.0, doc="sampling temperature for RL rollouts")
    eval_temperature: float = chz.field(default=0.0, doc="sampling temperature for evaluation (0: greedy)")
    loss_fn: RLLossFn = chz.field(default="importance_sampling", doc="|".join(choices(RLLossFn)))
    kl_penalty_coef: float = chz.field(default=0.0, doc="KL penalty against the base policy")

    # Preference learning and distillation (each only with its task; see METHOD_SETTINGS)
    dpo_beta: float | None = chz.field(
        default=None, doc="DPO: strength of the pull towards the reference (base) model (None: 0.1)"
    )
    teacher_model: str | None = chz.field(
        default=None,
        doc="distillation: the teacher, a model the backend serves or a tinker:// checkpoint path; several "
        "teachers comma-separated, each with its own prompt dataset (dataset=a,b in the same order)",
    )
    distillation_mode: DistillationMode | None = chz.field(
        default=None,
        doc="distillation: " + "|".join(choices(DistillationMode)) + " (None: off_policy)",
    )
    system_prompt: str | None = chz.field(
        default=None,
        doc="prompt_distillation: the system prompt to bake into the weights (text, or @path/to/file)",
    )
    behaviour_check: str | None = chz.field(
        default=None,
        doc="prompt_distillation: your check of the prompt's behaviour, path/to/file.py:function (gets the "
        "prompt row and an answer, returns a bool or a float in [0, 1]); rates for teacher, base and trained",
    )
    grader_model: str | None = chz.field(
        default=None,
        doc="rubric: the model that judges each response against each rubric item, any model the backend "
        "serves (None: the base model itself; never trained)",
    )
    grader_mode: GraderMode | None = chz.field(
        default=None,
        doc="rubric: " + "|".join(choices(GraderMode)) + " (None: probability, the grader's P(Yes) per item; "
        "sampled: the cookbook's <score>...</score> answer)",
    )

    # Tracking and checkpoints
    wandb_project: str | None = chz.field(default=None, doc="W&B project (None: WANDB_PROJECT from .env)")
    save_every: int = chz.field(default=20, doc="checkpoint every N steps (0: only the final one)")
    eval_every: int = chz.field(default=10, doc="evaluate every N steps during training (0: never)")
    dtype: EngineDtype = chz.field(default="auto", doc="local engine compute dtype: auto|bf16|fp32")
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


def supported_parameters() -> list[str]:
    """The sorted names of every `TrainConfig` field."""
    return sorted(chz.chz_fields(TrainConfig))


def unsupported_category(key: str) -> str | None:
    """What an unsupported key is (e.g. 'gradient clipping'), or None for a key not in the table."""
    return UNSUPPORTED_SETTINGS.get(_normalize_key(key))


def config_to_dict(cfg: TrainConfig) -> dict[str, Any]:
    """Every field of `cfg` with its value (plain JSON types), in declaration order."""
    return {name: getattr(cfg, name) for name in chz.chz_fields(TrainConfig)}


# --------------------------------------------------------------------------------------------- parsing


def _normalize_key(key: str) -> str:
    key = key.strip().lstrip("-").split(".", 1)[0]
    return key.replace("-", "_").lower()


def _optional(tp: Any) -> bool:
    return type(None) in typing.get_args(tp)


def _field_types() -> dict[str, Any]:
    return typing.get_type_hints(TrainConfig)


def _describe_type(tp: Any) -> str:
    names = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}
    args = typing.get_args(tp)
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        inner = [a for a in args if a is not type(None)]
        base = " or ".join(names.get(a, getattr(a, "__name__", str(a))) for a in inner)
        return f"{base} or None" if len(inner) < len(args) else base
    return names.get(tp, getattr(tp, "__name__", str(tp)))


def _example_value(name: str) -> str:
    default = getattr(TrainConfig(), name)
    if default is None:
        hint = _field_types()[name]
        inner = [a for a in typing.get_args(hint) if a is not type(None)]
        return {int: "100", float: "1e-4"}.get(inner[0] if inner else str, "VALUE")
    return str(default)


def help_text() -> str:
    """The `--help` text: every setting, its default and what it does."""
    hints = _field_types()
    defaults = TrainConfig()
    fields = chz.chz_fields(TrainConfig)
    rows = []
    for name, f in fields.items():
        tp = _describe_type(hints[name]).replace("an integer", "int").replace("a number", "float")
        tp = tp.replace("a string", "str")
        rows.append((name, tp, repr(getattr(defaults, name)), f._doc))
    w0 = max(len(r[0]) for r in rows)
    w1 = max(len(r[1]) for r in rows)
    w2 = max(len(r[2]) for r in rows)
    lines = [
        "usage: posttrain train [key=value ...]",
        "",
        "Fine-tune a model with LoRA through Tinker (or the local engine). Settings, as key=value:",
        "",
    ]
    for name, tp, default, doc in rows:
        lines.append(f"  {name:<{w0}}  {tp:<{w1}}  {default:<{w2}}  {doc}")
    lines += [
        "",
        "Not available (rejected): PPO clip epsilon, GAE lambda, dynamic batch size, optimizer choice "
        "(Adam only), gradient clipping, warmup, mixed precision, model parallelism.",
        "Example: posttrain train task=sft dataset=data.jsonl learning_rate=2e-4 num_epochs=2",
    ]
    return "\n".join(lines) + "\n"


_HELP_FLAGS = ("--help", "-h", "help")


def parse_train_args(argv: list[str]) -> TrainConfig:
    """Parse `key=value` arguments into a validated `TrainConfig`.

    Raises `HelpRequested` for --help/-h/help, `UnsupportedConfigError` for unknown or unsupported keys (and an
    lr_schedule outside LRSchedule), `ConfigError` for malformed arguments and values.
    """
    argv = list(argv)
    if any(a in _HELP_FLAGS for a in argv):
        raise HelpRequested(help_text())

    known = set(chz.chz_fields(TrainConfig))
    pairs: list[tuple[str, str]] = []
    unsupported: list[str] = []
    seen: dict[str, str] = {}
    for arg in argv:
        raw_key, sep, value = arg.partition("=")
        key = raw_key.strip()
        if key.startswith("--"):
            key = key[2:]
        if not key:
            raise ConfigError(f"Invalid argument {arg!r}: expected key=value, e.g. learning_rate=1e-4")
        if key not in known:
            if key not in unsupported:
                unsupported.append(key)
            continue
        if not sep:
            raise ConfigError(
                f"Invalid argument {arg!r}: expected key=value, e.g. {key}={_example_value(key)}"
            )
        if key in seen and seen[key] != value:
            raise ConfigError(f"{key} is given twice ({key}={seen[key]} and {key}={value}); give it once")
        seen[key] = value
        pairs.append((key, value))
    lr_schedule = seen.get("lr_schedule")
    if lr_schedule is not None and lr_schedule not in choices(LRSchedule):
        unsupported.append(f"lr_schedule={lr_schedule}")
    if unsupported:
        raise UnsupportedConfigError(unsupported)
    hints = _field_types()
    for key, value in pairs:
        allowed = choices(hints[key])
        if allowed and value not in allowed and not (value == "None" and _optional(hints[key])):
            _choice(key, value, allowed)

    cfg = _make(pairs)
    validate(cfg)
    return cfg


def _make(pairs: list[tuple[str, str]]) -> TrainConfig:
    try:
        return chz.Blueprint(TrainConfig).make_from_argv([f"{k}={v}" for k, v in pairs])
    except EntrypointHelpException as e:  # pragma: no cover - --help is intercepted earlier
        raise HelpRequested(help_text()) from e
    except _CHZ_ERRORS as e:
        bad = _first_bad_pair(pairs)
        if bad is None:
            first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ConfigError(f"Invalid settings: {first_line}") from None
        key, value = bad
        expected = _describe_type(_field_types()[key])
        raise ConfigError(
            f"Invalid value for {key}: {value!r} is not {expected} (e.g. {key}={_example_value(key)})"
        ) from None


def _first_bad_pair(pairs: list[tuple[str, str]]) -> tuple[str, str] | None:
    for key, value in pairs:
        try:
            chz.Blueprint(TrainConfig).make_from_argv([f"{key}={value}"])
        except _CHZ_ERRORS:
            return key, value
    return None


# ------------------------------------------------------------------------------------------ validation


def _choice(name: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"{name}={value!r} is not valid; allowed values: {', '.join(allowed)}")


def _at_least(name: str, value: Any, low: float, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not math.isfinite(value)
        or value < low
    ):
        raise ConfigError(f"{name}={value!r} is not valid; expected a number >= {low:g}")


def _between(name: str, value: Any, low: float, high: float) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not (low <= value <= high):
        raise ConfigError(f"{name}={value!r} is not valid; expected a number from {low:g} to {high:g}")


_RUN_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


def validate(cfg: TrainConfig) -> None:
    """Check enumerated values and ranges; raise `ConfigError` (one line) on the first problem."""
    hints = _field_types()
    enumerated = (
        "task", "backend", "loss_fn", "dtype", "train_on_what", "distillation_mode", "game_opponent", "grader_mode"
    )  # fmt: skip
    for name in enumerated:
        value = getattr(cfg, name)
        if value is not None:
            _choice(name, value, choices(hints[name]))
    if cfg.lr_schedule not in choices(LRSchedule):
        raise UnsupportedConfigError([f"lr_schedule={cfg.lr_schedule}"])
    if cfg.env is not None:
        ok = (
            cfg.env in ("math", "arithmetic", "code", "code:humaneval")
            or (cfg.env.startswith("reasoning_gym:") and cfg.env.split(":", 1)[1].strip() != "")
            or (cfg.env.startswith("game:") and cfg.env.split(":", 1)[1] in GAMES)
            or (cfg.env.startswith("tools:") and cfg.env.split(":")[1] in TOOL_ENVS)
        )
        if not ok:
            raise ConfigError(f"env={cfg.env!r} is not valid; allowed values: {', '.join(RL_ENVS)}")
    if cfg.game_opponent is not None and cfg.env != "game:tic_tac_toe":
        raise ConfigError(
            f"game_opponent is only used by env=game:tic_tac_toe, not env={cfg.env}; leave it out"
        )

    for name in (
        "dataset",
        "dataset_config",
        "eval_dataset",
        "eval_split",
        "renderer_name",
        "wandb_project",
        "teacher_model",
        "system_prompt",
        "behaviour_check",
        "reward_fn",
        "grader_model",
    ):
        value = getattr(cfg, name)
        if value is not None and not value.strip():
            raise ConfigError(f"{name} is empty; give a value or leave it out")
    for name in ("dataset_split", "model_name", "results_dir"):
        if not getattr(cfg, name).strip():
            raise ConfigError(f"{name} is empty; give a value")
    if cfg.run_name is not None and (not _RUN_NAME_RE.match(cfg.run_name) or ".." in cfg.run_name):
        raise ConfigError(
            f"run_name={cfg.run_name!r} is not valid; use letters, digits, '.', '_' and '-' "
            "(it names the folder results/logs/<run_name>)"
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
    if cfg.wandb_project is not None and "/" in cfg.wandb_project:
        raise ConfigError(f"wandb_project={cfg.wandb_project!r} is not valid; a W&B project name has no '/'")

    if cfg.learning_rate is not None:
        if not (isinstance(cfg.learning_rate, int | float) and 0 < cfg.learning_rate < 1):
            raise ConfigError(
                f"learning_rate={cfg.learning_rate!r} is not valid; expected a number in (0, 1)"
            )
    _at_least("num_epochs", cfg.num_epochs, 1)
    _at_least("max_steps", cfg.max_steps, 1, allow_none=True)
    _at_least("batch_size", cfg.batch_size, 1)
    _at_least("lora_rank", cfg.lora_rank, 1)
    _at_least("max_length", cfg.max_length, 16)
    _between("max_train_rows", cfg.max_train_rows, 1, MAX_TRAIN_ROWS_LIMIT)
    _between("max_eval_rows", cfg.max_eval_rows, 1, MAX_EVAL_ROWS_LIMIT)
    _at_least("eval_concurrency", cfg.eval_concurrency, 1)
    _at_least("seed", cfg.seed, 0)
    if isinstance(cfg.group_size, bool) or not isinstance(cfg.group_size, int) or cfg.group_size < 2:
        raise ConfigError(
            f"group_size={cfg.group_size!r} is not valid; expected an integer >= 2 "
            "(RL advantages compare rollouts within a group)"
        )
    _at_least("max_tokens", cfg.max_tokens, 1)
    if isinstance(cfg.verifier_timeout, bool) or not (
        isinstance(cfg.verifier_timeout, int | float) and 0 < cfg.verifier_timeout <= 3600
    ):
        raise ConfigError(
            f"verifier_timeout={cfg.verifier_timeout!r} is not valid; expected seconds in (0, 3600]"
        )
    if not (isinstance(cfg.temperature, int | float) and 0 < cfg.temperature <= 2):
        raise ConfigError(f"temperature={cfg.temperature!r} is not valid; expected a number in (0, 2]")
    _between("eval_temperature", cfg.eval_temperature, 0, 2)
    _at_least("kl_penalty_coef", cfg.kl_penalty_coef, 0)
    _at_least("save_every", cfg.save_every, 0)
    _at_least("eval_every", cfg.eval_every, 0)
    if cfg.dpo_beta is not None and not (isinstance(cfg.dpo_beta, int | float) and cfg.dpo_beta > 0):
        raise ConfigError(f"dpo_beta={cfg.dpo_beta!r} is not valid; expected a number > 0")
    if cfg.task != "auto":
        check_method_settings(cfg, cfg.task)
    check_teachers(cfg)


# Settings that belong to one method: giving one with another task is a mistake worth stopping for (the user
# believes it does something). task=auto resolves first, then the same check runs (pipeline.run.choose_task).
METHOD_SETTINGS: dict[str, str] = {
    "dpo_beta": "dpo",
    "teacher_model": "distillation",
    "distillation_mode": "distillation",
    "system_prompt": "prompt_distillation",
    "behaviour_check": "prompt_distillation",
    "reward_fn": "rl",
    "grader_model": "rubric",
    "grader_mode": "rubric",
}


def check_method_settings(cfg: TrainConfig, task: str) -> None:
    """One-line ConfigError naming the option when a method's setting is given to another task, or missing."""
    for name, owner in METHOD_SETTINGS.items():
        if getattr(cfg, name) is not None and task != owner:
            raise ConfigError(f"{name} is only used by task={owner}, not task={task}; leave it out")
    if task == "distillation" and cfg.teacher_model is None:
        raise ConfigError(
            "task=distillation needs teacher_model= (a model the backend serves or a tinker:// checkpoint)"
        )
    if task == "prompt_distillation" and cfg.system_prompt is None:
        raise ConfigError("task=prompt_distillation needs system_prompt= (the text, or @path/to/file)")


# --- distillation with several teachers ---------------------------------------------------------------------
# The cookbook's multi-teacher recipe (recipes/distillation/on_policy_multi_teacher.py) pairs each prompt
# dataset with its own teacher. Here: teacher_model=A,B with dataset=a,b, in the same order.

# Data options that take one value for every dataset or one per dataset (comma-separated, in order).
PER_DATASET_OPTIONS = ("dataset_config", "dataset_split", "eval_dataset", "eval_split")


def teacher_models(cfg: TrainConfig) -> list[str]:
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


def data_sources(cfg: TrainConfig) -> list[DataSource]:
    """The datasets a run loads: `dataset=` as given; with several teachers one per teacher, where each
    per-dataset option is one value for all or one per dataset, and the row limits are shared out equally
    (the run as a whole keeps to max_train_rows / max_eval_rows)."""
    n = len(teacher_models(cfg))
    if n < 2:
        return [
            DataSource(
                cfg.dataset, cfg.dataset_config, cfg.dataset_split, cfg.eval_dataset, cfg.eval_split,
                cfg.max_train_rows, cfg.max_eval_rows,
            )
        ]  # fmt: skip
    assert cfg.dataset is not None  # check_teachers guarantees one dataset per teacher
    options = {name: _per_dataset(getattr(cfg, name), n) for name in PER_DATASET_OPTIONS}
    return [
        DataSource(
            dataset.strip(), options["dataset_config"][i], options["dataset_split"][i] or "train",
            options["eval_dataset"][i], options["eval_split"][i], cfg.max_train_rows // n, cfg.max_eval_rows // n,
        )
        for i, dataset in enumerate(cfg.dataset.split(","))
    ]  # fmt: skip


def _per_dataset(value: str | None, n: int) -> list[str | None]:
    if value is None:
        return [None] * n
    parts = [part.strip() for part in value.split(",")]
    return parts * n if len(parts) == 1 else list(parts)


def check_teachers(cfg: TrainConfig) -> None:
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
