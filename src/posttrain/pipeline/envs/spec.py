"""The `env=` setting, parsed once into a typed value: `NAME`, `NAME:VARIANT` or `NAME:VARIANT:key=value,...`.

Examples: `math`, `arithmetic`, `code:humaneval`, `game:tic_tac_toe`, `tools:search:max_turns=6`,
`reasoning_gym:basic_arithmetic:min_terms=2,max_terms=2`. Option values are JSON where they parse as JSON
(numbers, booleans, lists), else text. Which names, variants and options exist is each environment's business
(`envs.registry`); this module only reads the grammar.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from posttrain.errors import ConfigError


@dataclass(frozen=True)
class EnvSpec:
    name: str  # the environment family: math, arithmetic, reasoning_gym, code, game, tools, rubric
    variant: str = ""  # e.g. the game, the tool, the reasoning-gym task
    options: dict[str, Any] = field(default_factory=dict)

    def __str__(self) -> str:
        text = ":".join(part for part in (self.name, self.variant) if part)
        if self.options:
            text += ":" + ",".join(f"{k}={_show(v)}" for k, v in self.options.items())
        return text

    @property
    def key(self) -> str:
        """The registry key: `NAME:VARIANT` where the variant chooses the environment (a game, a tool)."""
        return f"{self.name}:{self.variant}" if self.variant else self.name


def _show(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(list(value) if isinstance(value, tuple) else value)


def key_values(text: str, setting: str) -> dict[str, Any]:
    """`key=value,...` with values JSON where they parse, else text; `setting` (e.g. `env=...`) names it in the
    one-line ConfigError. The grammar of env= options and of verifiers_args=."""
    found: dict[str, Any] = {}
    for item in filter(None, (o.strip() for o in text.split(","))):
        key, sep, value = (part.strip() for part in item.partition("="))
        if not sep or not key.isidentifier():
            raise ConfigError(f"{setting}: expected key=value,..., got {item!r}")
        try:
            found[key] = json.loads(value)
        except ValueError:
            found[key] = value
    return found


def parse_env(text: str) -> EnvSpec:
    """`env=` as given by the user; a ConfigError (one line) names what does not parse."""
    name, colon, rest = text.strip().partition(":")
    variant, _, options_text = rest.partition(":")
    if not name.strip() or (colon and not variant.strip()):
        raise ConfigError(
            f"env={text!r} is not valid; expected NAME, NAME:VARIANT or NAME:VARIANT:key=value,..."
        )
    options = key_values(options_text, f"env={text}")
    # Tuples, not lists: the spec is frozen and hashed.
    return EnvSpec(
        name.strip(), variant.strip(), {k: tuple(v) if isinstance(v, list) else v for k, v in options.items()}
    )
