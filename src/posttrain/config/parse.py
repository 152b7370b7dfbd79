"""Reading `key=value` arguments into a settings class (chz, as the cookbook does), and what is refused.

Anything that is not a field of the class is rejected: the keys people reach for when they want a setting Tinker
does not expose (PPO clip epsilon, GAE lambda, dynamic batch size, optimizer choice, gradient clipping, warmup,
mixed precision, model parallelism; see `UNSUPPORTED_SETTINGS`) and any other unknown key alike. The error is an
`UnsupportedConfigError` whose message is the product's fixed sentence `UNSUPPORTED_SENTENCE`, then on the same
line ` Unsupported: <keys>. Supported parameters: <sorted field names>.`
"""

from __future__ import annotations

import inspect
import types
import typing
from typing import Any, TypeVar

import chz
from chz.blueprint import (
    ConstructionException,
    EntrypointHelpException,
    ExtraneousBlueprintArg,
    InvalidBlueprintArg,
    MissingBlueprintArg,
)

from posttrain.config.checks import choice, choices
from posttrain.errors import ConfigError

T = TypeVar("T")

UNSUPPORTED_SENTENCE = (
    "This configuration is not currently available in the Tinker training configs. "
    "The available parameters are listed in the Config classes. "
    "Let me know if you'd like to proceed with the supported options."
)
# What chz raises for arguments it cannot turn into a settings object.
_CHZ_ERRORS = (
    ConstructionException,
    ExtraneousBlueprintArg,
    InvalidBlueprintArg,
    MissingBlueprintArg,
    ValueError,
    TypeError,
)

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

    def __init__(self, keys: list[str], supported: list[str]):
        self.keys = list(keys)
        described = [f"{k} ({c})" if (c := unsupported_category(k)) else k for k in self.keys]
        super().__init__(
            f"{UNSUPPORTED_SENTENCE} Unsupported: {', '.join(described)}. Supported parameters: {', '.join(supported)}."
        )


def unsupported_category(key: str) -> str | None:
    """What an unsupported key is (e.g. 'gradient clipping'), or None for a key not in the table."""
    return UNSUPPORTED_SETTINGS.get(_normalize_key(key))


def to_dict(cfg: Any, names: typing.Iterable[str] | None = None) -> dict[str, Any]:
    """The settings (every field, or `names`) and their values, in declaration order."""
    fields = chz.chz_fields(type(cfg))
    return {name: getattr(cfg, name) for name in fields if names is None or name in names}


def _normalize_key(key: str) -> str:
    key = key.strip().lstrip("-").split(".", 1)[0]
    return key.replace("-", "_").lower()


def _optional(tp: Any) -> bool:
    return type(None) in typing.get_args(tp)


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _describe_type(tp: Any) -> str:
    names = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}
    args = typing.get_args(tp)
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        inner = [a for a in args if a is not type(None)]
        base = " or ".join(names.get(a, getattr(a, "__name__", str(a))) for a in inner)
        return f"{base} or None" if len(inner) < len(args) else base
    return names.get(tp, getattr(tp, "__name__", str(tp)))


def _example_value(cls: type, name: str) -> str:
    default = getattr(cls(), name)
    if default is None:
        hint = _field_types(cls)[name]
        inner = [a for a in typing.get_args(hint) if a is not type(None)]
        return {int: "100", float: "1e-4"}.get(inner[0] if inner else str, "VALUE")
    return str(default)


def help_text(cls: type) -> str:
    """The `--help` text: every setting, its default and what it does."""
    hints = _field_types(cls)
    defaults = cls()
    fields = chz.chz_fields(cls)
    rows = []
    for name, f in fields.items():
        tp = _describe_type(hints[name]).replace("an integer", "int").replace("a number", "float")
        tp = tp.replace("a string", "str")
        rows.append((name, tp, repr(getattr(defaults, name)), f._doc))
    w0 = max(len(r[0]) for r in rows)
    w1 = max(len(r[1]) for r in rows)
    w2 = max(len(r[2]) for r in rows)
    command, about = _command_of(cls)
    if command != "train":
        lines = [f"usage: posttrain {command} [key=value ...]", "", about, "", "Settings, as key=value:", ""]
        lines += [f"  {name:<{w0}}  {tp:<{w1}}  {default:<{w2}}  {doc}" for name, tp, default, doc in rows]
        return "\n".join(lines) + "\n"
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


def _command_of(cls: type) -> tuple[str, str]:
    """('chat', its description) from a settings class documented as "posttrain chat: ..."; train otherwise."""
    doc = inspect.cleandoc(cls.__doc__ or "")
    head, sep, _ = doc.partition(":")
    words = head.split()
    if sep and len(words) == 2 and words[0] == "posttrain":
        return words[1], doc
    return "train", doc


_HELP_FLAGS = ("--help", "-h", "help")


def setting_key(arg: str) -> str:
    """'learning_rate' of 'learning_rate=1e-4' (or of '--learning_rate=...')."""
    return arg.partition("=")[0].strip().removeprefix("--")


def parse_args(cls: type[T], argv: list[str]) -> T:
    """Parse `key=value` arguments into a `cls` (not yet validated beyond types and Literal values).

    Raises `HelpRequested` for --help/-h/help, `UnsupportedConfigError` for unknown or unsupported keys (and an
    lr_schedule outside LRSchedule), `ConfigError` for malformed arguments and values.
    """
    argv = list(argv)
    if any(a in _HELP_FLAGS for a in argv):
        raise HelpRequested(help_text(cls))

    known = set(chz.chz_fields(cls))
    pairs: list[tuple[str, str]] = []
    unsupported: list[str] = []
    seen: dict[str, str] = {}
    for arg in argv:
        _, sep, value = arg.partition("=")
        key = setting_key(arg)
        if not key:
            raise ConfigError(f"Invalid argument {arg!r}: expected key=value, e.g. learning_rate=1e-4")
        if key not in known:
            if key not in unsupported:
                unsupported.append(key)
            continue
        if not sep:
            raise ConfigError(
                f"Invalid argument {arg!r}: expected key=value, e.g. {key}={_example_value(cls, key)}"
            )
        if key in seen and seen[key] != value:
            raise ConfigError(f"{key} is given twice ({key}={seen[key]} and {key}={value}); give it once")
        seen[key] = value
        pairs.append((key, value))
    hints = _field_types(cls)
    # The cookbook's learning-rate schedules are all there are: another is a warmup or schedule Tinker lacks.
    lr_schedule = seen.get("lr_schedule")
    if (
        lr_schedule is not None
        and "lr_schedule" in hints
        and lr_schedule not in choices(hints["lr_schedule"])
    ):
        unsupported.append(f"lr_schedule={lr_schedule}")
    if unsupported:
        raise UnsupportedConfigError(unsupported, sorted(known))
    for key, value in pairs:
        allowed = choices(hints[key])
        if allowed and value not in allowed and not (value == "None" and _optional(hints[key])):
            choice(key, value, allowed)
    return _make(cls, pairs)


def _make(cls: type[T], pairs: list[tuple[str, str]]) -> T:
    try:
        return chz.Blueprint(cls).make_from_argv([f"{k}={v}" for k, v in pairs])
    except EntrypointHelpException as e:  # pragma: no cover - --help is intercepted earlier
        raise HelpRequested(help_text(cls)) from e
    except _CHZ_ERRORS as e:
        bad = _first_bad_pair(cls, pairs)
        if bad is None:
            first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ConfigError(f"Invalid settings: {first_line}") from None
        key, value = bad
        expected = _describe_type(_field_types(cls)[key])
        raise ConfigError(
            f"Invalid value for {key}: {value!r} is not {expected} (e.g. {key}={_example_value(cls, key)})"
        ) from None


def _first_bad_pair(cls: type, pairs: list[tuple[str, str]]) -> tuple[str, str] | None:
    for key, value in pairs:
        try:
            chz.Blueprint(cls).make_from_argv([f"{key}={value}"])
        except _CHZ_ERRORS:
            return key, value
    return None
