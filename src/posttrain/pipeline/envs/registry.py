"""Every RL environment, one line each, by the `env=` name that chooses it (`NAME` or `NAME:VARIANT`).

`env=` is parsed once (`spec.parse_env`) and looked up here. An environment's module is imported only when it is
used: they load the cookbook and its env classes (seconds), and the checks before a run must answer fast.
A new environment is one module (`envs.base.Environment`) and one line here.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from posttrain.errors import ConfigError
from posttrain.pipeline.envs.spec import EnvSpec, parse_env

if TYPE_CHECKING:
    from posttrain.pipeline.data import LoadedData
    from posttrain.pipeline.envs.base import Environment


@dataclass(frozen=True)
class Entry:
    path: str  # "module:attribute": the Environment (a class, or an instance)
    # how env= help and errors list it (None: by its key; (): not at all)
    shown: tuple[str, ...] | None = None
    partner: bool = False  # a served model plays its other side (`partner_model=`, `EnvContext.partner`)
    # "module:function" in a light module: the environment's own inputs (files) checked before `path` is imported
    inputs: str | None = None
    # "module:Class" in light modules: its own settings (chz option groups, `envs.settings`), those that shape
    # its problems (any method taking prompts from it), and those only used where it is played (task=rl)
    options: tuple[str, ...] = ()
    played_options: tuple[str, ...] = ()


ENVIRONMENTS: dict[str, Entry] = {
    "math": Entry(
        "posttrain.pipeline.envs.qa:MATH",
        options=("posttrain.pipeline.envs.qa_settings:AnswerGraderOptions",),
    ),
    "arithmetic": Entry("posttrain.pipeline.envs.qa:ARITHMETIC"),
    "reasoning_gym": Entry("posttrain.pipeline.envs.qa:REASONING_GYM", ("reasoning_gym:TASK",)),
    "code": Entry("posttrain.pipeline.envs.code:CODE", ("code", "code:harder", "code:humaneval")),
    "game:guess_number": Entry("posttrain.pipeline.envs.games.guess_number:GuessNumber"),
    "game:tic_tac_toe": Entry(
        "posttrain.pipeline.envs.games.tictactoe:TicTacToe",
        options=("posttrain.pipeline.envs.games.tictactoe_settings:OpponentOptions",),
    ),
    "game:twenty_questions": Entry(
        "posttrain.pipeline.envs.games.twenty_questions:TwentyQuestions",
        partner=True,
        played_options=("posttrain.pipeline.envs.games.twenty_questions:PartnerOptions",),
    ),
    "tools:calculator": Entry("posttrain.pipeline.envs.tools.agent:ToolUse"),
    "tools:search": Entry(
        "posttrain.pipeline.envs.tools.agent:ToolUse",
        inputs="posttrain.pipeline.envs.tools.corpus:check_inputs",
        played_options=("posttrain.pipeline.envs.tools.corpus:SearchOptions",),
    ),
    "verifiers": Entry(
        "posttrain.pipeline.envs.verifiers_env:VerifiersEnvironment",
        ("verifiers:NAME",),
        options=("posttrain.pipeline.envs.verifiers_env:VerifiersOptions",),
    ),
    "rubric": Entry("posttrain.pipeline.envs.rubric:RubricConversations", ()),  # task=rubric's rows
}
# What `env=` offers, for help and errors.
CHOICES = tuple(
    c for key, entry in ENVIRONMENTS.items() for c in (entry.shown if entry.shown is not None else (key,))
)


# The environment a task=rl run without env= gets, by its data's format (no data, or another format: math).
BY_DATA_FORMAT: dict[str, str] = {"code": "code", "secret": "game:twenty_questions"}
DEFAULT = "math"


def default_env(data_format: str | None) -> str:
    return BY_DATA_FORMAT.get(data_format or "", DEFAULT)


def data_defaults() -> set[str]:
    """The environments a run without env= may get, by its data."""
    return {DEFAULT, *BY_DATA_FORMAT.values()}


def lookup(spec: EnvSpec) -> str:
    """The registry key of an `env=` value, or a one-line ConfigError listing what exists."""
    # A variant that names an environment (a game, a tool set) first; else the family (its variant a parameter).
    for key in (spec.key, spec.name):
        if key in ENVIRONMENTS:
            return key
    raise ConfigError(f"env={spec}: no such environment; allowed values: {', '.join(CHOICES)}")


def check(text: str) -> EnvSpec:
    """`env=` parsed and known (imports nothing heavy)."""
    spec = parse_env(text)
    lookup(spec)
    return spec


def takes_partner(spec: EnvSpec) -> bool:
    return ENVIRONMENTS[lookup(spec)].partner


def check_inputs(spec: EnvSpec, cfg: Any, data: LoadedData | None) -> None:
    """The environment's own inputs (its `inputs` check), before its module is imported: a bad file is refused
    in a fraction of a second, not after the seconds that import takes."""
    check = ENVIRONMENTS[lookup(spec)].inputs
    if check is not None:
        module, _, attribute = check.partition(":")
        getattr(importlib.import_module(module), attribute)(spec, cfg, data)


def environment(spec: EnvSpec) -> Environment:
    module, _, attribute = ENVIRONMENTS[lookup(spec)].path.partition(":")
    found = getattr(importlib.import_module(module), attribute)
    return found() if isinstance(found, type) else found
