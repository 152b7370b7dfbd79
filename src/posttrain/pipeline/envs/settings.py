"""The environments' settings: `env=` itself, and each environment's own option group, declared beside it and
named on its registry line (`registry.Entry.options`), collected here the way `pipeline.settings` collects the
methods' configs. A setting an environment declares, given with another environment, is refused by name.

`ProblemSettings` holds the groups that shape an environment's problems (the methods that take prompts from an
environment: RL, distillation); `EnvSettings` adds those that only matter where the environment is played
(task=rl: a game's partner, the search tool's corpus).
"""

from __future__ import annotations

import importlib
from functools import cache
from typing import Any

import chz

from posttrain.config.checks import not_blank
from posttrain.errors import ConfigError
from posttrain.pipeline.envs import registry
from posttrain.pipeline.envs.spec import EnvSpec


@chz.chz
class EnvOptions:
    env: str | None = chz.field(
        default=None, doc="RL environment: " + "|".join(registry.CHOICES) + " (tools: add :max_turns=N)"
    )

    @staticmethod
    def check(cfg: Any) -> None:
        not_blank(cfg, "env")
        spec = registry.check(cfg.env) if cfg.env is not None else None
        check_owned(cfg, spec)


def _load(path: str) -> type:
    module, _, attribute = path.partition(":")
    return getattr(importlib.import_module(module), attribute)


@cache
def _owners(played: bool) -> dict[type, list[str]]:
    """Each option group -> the registry keys of the environments that declare it."""
    owners: dict[type, list[str]] = {}
    for key, entry in registry.ENVIRONMENTS.items():
        for path in (*entry.options, *(entry.played_options if played else ())):
            owners.setdefault(_load(path), []).append(key)
    return owners


def _assemble(name: str, bases: tuple[type, ...], doc: str) -> type:
    namespace = {"__annotations__": {}, "__doc__": doc, "__module__": __name__, "__qualname__": name}
    return chz.chz(type(name, bases, namespace))


ProblemSettings: Any = _assemble(
    "ProblemSettings", (EnvOptions, *_owners(played=False)), "env= and the settings of its problems"
)
EnvSettings: Any = _assemble(
    "EnvSettings",
    (ProblemSettings, *(g for g in _owners(played=True) if g not in _owners(played=False))),
    "env= and every environment's own settings",
)


def _label(key: str) -> str:
    shown = registry.ENVIRONMENTS[key].shown
    return "|".join(shown) if shown else key


def check_owned(cfg: Any, spec: EnvSpec | None) -> None:
    """Each environment setting given is declared by `spec`'s environment; without env= (the data chooses it),
    by one of the environments data can choose."""
    candidates = {registry.lookup(spec)} if spec is not None else registry.data_defaults()
    for group, keys in _owners(played=True).items():
        for name, field in chz.chz_fields(group).items():
            if getattr(cfg, name, field._default) == field._default or candidates & set(keys):
                continue
            where = f", not env={spec}" if spec is not None else ""
            raise ConfigError(
                f"{name} is only used by env={'|'.join(map(_label, keys))}{where}; leave it out"
            )
