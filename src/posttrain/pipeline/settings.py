"""Every setting of posttrain, for the command line: the run's own (`config.run.RunSettings`) and each method's
(declared with the method, beside the cookbook Config it drives: `SFTConfig`, `RLConfig`, ...).

`TrainConfig` is all of them in one chz class, so one `key=value` command line reads them and `--help` lists them;
it is assembled from the method registry (a new method adds its settings by its registry line alone). Once the
method is known, a setting given that the method does not take is refused in one line naming both, and the method
is given its own config, holding only what it takes (which is also all that summary.json records).
"""

from __future__ import annotations

from typing import Any, Literal

import chz

from posttrain.config.checks import literals
from posttrain.config.parse import parse_args, to_dict
from posttrain.config.run import RunSettings, check_run
from posttrain.pipeline.methods import METHODS, config_class
from posttrain.pipeline.methods.choice import check_method_settings

TaskName = Literal[("auto", *METHODS)]  # type: ignore[valid-type]  # the registry's names


def _assemble() -> type:
    """One chz class inheriting every method's config (they share their common groups)."""
    bases = tuple(dict.fromkeys(config_class(name) for name in METHODS))
    namespace = {
        "__annotations__": {"task": TaskName},
        "task": chz.field(
            default="auto", doc="|".join(("auto", *METHODS)) + " (auto: inferred from the data and settings)"
        ),
        "__doc__": "posttrain: LoRA fine-tuning through the Tinker API (or the bundled local engine).",
        "__module__": __name__,
        "__qualname__": "TrainConfig",
    }
    return chz.chz(type("TrainConfig", bases, namespace))


TrainConfig: Any = _assemble()


def parse_train_args(argv: list[str]) -> Any:
    """`key=value` arguments as a checked TrainConfig (see `config.parse.parse_args` for what is refused)."""
    cfg = parse_args(TrainConfig, argv)
    validate(cfg)
    return cfg


def validate(cfg: Any) -> None:
    """The run's settings, every setting group's own check, and (with task= given) the method's ownership."""
    for group in type(cfg).__mro__:
        check = group.__dict__.get("check")
        if isinstance(check, staticmethod):
            check.__func__(cfg)
    literals(cfg, type(cfg))
    check_run(cfg)
    if cfg.task != "auto":
        check_method_settings(cfg, cfg.task)


def method_config(cfg: RunSettings, task: str) -> RunSettings:
    """The method's own config: its settings' values from `cfg`, with those a setting group chooses when left out
    (its `chosen(cfg)`: name -> value) filled in, so the method runs with, and summary.json records, what is used.
    Values are taken as given (a munged setting left out stays left out), so a rule that fills one in later, as
    `methods.length` does for num_epochs and batch_size, still tells given from not given."""
    cls = config_class(task)
    values = {name: getattr(cfg, field.x_name) for name, field in chz.chz_fields(cls).items()}
    for group in cls.__mro__:
        chosen = group.__dict__.get("chosen")
        if isinstance(chosen, staticmethod):
            values |= chosen.__func__(cfg)
    return cls(**values)


def config_to_dict(cfg: RunSettings) -> dict[str, Any]:
    """A method's config as summary.json records it (every setting it takes, with the value used)."""
    return to_dict(cfg)
