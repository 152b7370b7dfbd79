"""`env=verifiers:NAME`: an environment built with Prime Intellect's `verifiers` library (the Environments Hub's).

NAME is loaded as the cookbook's `verifiers_rl` recipe loads it (`vf.load_environment(NAME, **verifiers_args)`:
its module imported, its `load_environment` called, the same steps done here before verifiers itself is imported):
an installed environment package (`prime env install owner/NAME`, or pip; `owner/NAME` is accepted as the Hub
writes it), or a local module path (`env=verifiers:path/to/my_env.py`, or a package folder). Its dataset rows are
the training problems, its eval dataset the held-out ones (when it has none, rows held out of its dataset), and
its rubric's score the reward.

The recipe hands whole groups to the environment (`run_group`) in place of the cookbook's rollout function; here
one `VerifiersEnv` (`verifiers_rollout`) is the cookbook `Env` of one rollout, so training (`rl.train`) and evaluation
(`evaluation.episodes`) run the same episode as every other environment. The verifiers rollout itself runs
unchanged, its own turn loop, `env_response` and stop conditions included (a `MultiTurnEnv`): it sees a client
whose every chat request becomes the Env's next observation and whose reply is what the policy sampled. When
the rollout ends, its rubric scores it (`score_group` of one, which takes individual and group reward functions).
Tool-calling and completion-style environments are refused: the renderers here have no OpenAI tool schema path.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import json
import logging
import os
import signal
import sys
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

import chz

# Nothing here imports the Tinker SDK, the cookbook's renderers or verifiers at import time (torch and datasets
# come with them: seconds): a missing or broken environment is refused before any of them is needed.
from posttrain.errors import ConfigError
from posttrain.pipeline.envs.base import (
    EnvContext,
    Environment,
    Episode,
    ProblemSet,
    mean_score,
    n_eval,
    problem_group,
)
from posttrain.pipeline.envs.spec import key_values

if TYPE_CHECKING:
    from tinker_cookbook import renderers
    from tinker_cookbook.rl.types import Env, EnvGroupBuilder

    from posttrain.pipeline.data import LoadedData
    from posttrain.pipeline.envs.base import ProblemSettings
    from posttrain.pipeline.envs.spec import EnvSpec
    from posttrain.pipeline.results import RLExample


# A MultiTurnEnv without max_turns ends by its own stop conditions: the plan's token estimate assumes this many.
@chz.chz
class VerifiersOptions:
    verifiers_args: str | None = chz.field(
        default=None,
        doc="env=verifiers:NAME: the arguments of its load_environment, key=value,... (values JSON where they "
        "parse) or a JSON object",
    )


UNBOUNDED_TURNS_ESTIMATE = 10

_LOADED: dict[tuple[str, str], Any] = {}


def parse_args(text: str | None) -> dict[str, Any]:
    """`verifiers_args=`: key=value pairs (values JSON where they parse, else text), or a JSON object as the
    recipe's `vf_env_args` takes; a one-line ConfigError otherwise."""
    if text is None or not text.strip():
        return {}
    if text.strip().startswith("{"):
        try:
            found = json.loads(text)
        except ValueError as e:
            raise ConfigError(f"verifiers_args={text}: not a JSON object ({e})") from None
        if not isinstance(found, dict):
            raise ConfigError(f"verifiers_args={text}: not a JSON object")
        return found
    return key_values(text, f"verifiers_args={text}")


def _module_name(variant: str) -> str:
    """The module to import: a local path's (its folder put on sys.path), else the package's, named the way
    `vf.load_environment` names it (the last part of owner/env-id, '-' as '_')."""
    path = Path(variant).expanduser()
    if variant.endswith(".py") or path.is_dir():
        if not path.exists():
            raise ConfigError(f"env=verifiers:{variant}: no such file or folder")
        path = path.resolve()
        if str(path.parent) not in sys.path:
            sys.path.insert(0, str(path.parent))
        return path.stem if path.is_file() else path.name
    return variant.replace("-", "_").split("/")[-1]


@contextlib.contextmanager
def _quiet_load() -> Iterator[None]:
    """Loading an environment, with what verifiers does on load kept off the user's terminal and out of the run's
    own signal handling."""
    vf_logger = logging.getLogger("verifiers")
    # its INFO lines (each load, each default arg) would flood the run's log
    if "VF_LOG_LEVEL" not in os.environ:
        vf_logger.setLevel(logging.WARNING)
    level = vf_logger.level
    # A failed load is reported once, as our one line, not also as its logged traceback.
    vf_logger.setLevel(logging.CRITICAL + 1)
    # vf.Environment installs SIGINT/SIGTERM handlers on construction; the run's own (stop cleanly, save) stay.
    main = threading.current_thread() is threading.main_thread()
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)} if main else {}
    try:
        yield
    finally:
        vf_logger.setLevel(level)
        for sig, handler in handlers.items():
            if handler is not None:
                signal.signal(sig, handler)


@contextlib.contextmanager
def _no_dataset_bars() -> Iterator[None]:
    """Its datasets' "Map: 100%|..." bars kept off the terminal: loading happens before the run's output is
    captured into its log. Only when the module brought datasets in (verifiers does): importing it here would
    cost a second to a load that is about to fail."""
    datasets = sys.modules.get("datasets")
    bars = datasets is not None and datasets.is_progress_bar_enabled()
    if bars:
        datasets.disable_progress_bars()
    try:
        yield
    finally:
        if bars:
            datasets.enable_progress_bars()


def _installed_module(variant: str) -> str:
    """The environment's module name, or a one-line ConfigError when no such module can be imported (found
    without importing it)."""
    module = _module_name(variant)
    try:
        found = module.isidentifier() and importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        found = False
    if not found:
        # The Hub installs by owner/name: a name given with its owner is the command as it stands; a bare name
        # (which `prime env install` would look for in ./environments) needs its owner, which only the user knows.
        hub = variant if "/" in variant else f"OWNER/{variant}"
        owner = "" if "/" in variant else ", OWNER being its publisher on the Environments Hub"
        raise ConfigError(
            f"env=verifiers:{variant}: no environment module {module!r} is installed (install it with "
            f"`prime env install {hub}`{owner}, or pip, or give the path of its module)"
        )
    return module


def _one_line(error: BaseException) -> str:
    return f"{type(error).__name__}: {' '.join(str(error).split()) or 'no message'}"


def _import(variant: str, module: str) -> ModuleType:
    """The environment's module imported (what `vf.load_environment` does first), its failure one line."""
    try:
        imported = importlib.import_module(module)
    except Exception as e:
        raise ConfigError(
            f"env=verifiers:{variant}: importing module {module!r} failed: {_one_line(e)}"
        ) from None
    if not callable(getattr(imported, "load_environment", None)):
        raise ConfigError(
            f"env=verifiers:{variant}: module {module!r} ({getattr(imported, '__file__', None) or 'a namespace'}) "
            "has no load_environment function: another module of that name comes first, or it is not an environment"
        )
    return imported


def _call(variant: str, module: ModuleType, args: dict[str, Any]) -> Any:
    """`module.load_environment(**args)`, named as `vf.load_environment` names it; its failure one line."""
    try:
        env = module.load_environment(**args)
    except Exception as e:
        shown = ", ".join(f"{k}={v!r}" for k, v in args.items())
        raise ConfigError(
            f"env=verifiers:{variant}: load_environment({shown}) failed: {_one_line(e)}"
        ) from None
    # verifiers is imported only now: the environment's own module has imported it already (it built `env`).
    import verifiers as vf

    if not isinstance(env, vf.Environment):
        raise ConfigError(
            f"env=verifiers:{variant}: load_environment returned {type(env).__name__}, not a vf.Environment"
        )
    env.env_id = env.env_id or module.__name__  # as `vf.load_environment(module name)` sets them
    env.env_args = env.env_args or args
    return env


def load(variant: str, args: dict[str, Any]) -> Any:
    """The verifiers Environment (once per process and arguments), or a one-line ConfigError: not installed, its
    import or its load_environment raised, or it is of a kind not supported."""
    key = (variant, json.dumps(args, sort_keys=True, default=str))
    if key in _LOADED:
        return _LOADED[key]
    if not variant:
        raise ConfigError(
            "env=verifiers needs the environment: env=verifiers:NAME (an installed package or a module path)"
        )
    module = _installed_module(variant)
    with _quiet_load():
        imported = _import(variant, module)
        with _no_dataset_bars():
            env = _call(variant, imported, args)
    if env.message_type != "chat" or env.oai_tools:
        kind = "tool-calling" if env.oai_tools else f"{env.message_type}-style"
        raise ConfigError(
            f"env=verifiers:{variant}: a {kind} environment is not supported (chat environments without tools are)"
        )
    _LOADED[key] = env
    return env


def _rows(dataset: Any, limit: int, args: dict[str, Any]) -> list[dict]:
    """A verifiers dataset's rows as problems (JSON: they are written to the run's data folder and reread)."""
    from tinker_cookbook import renderers

    rows = []
    for row in dataset.select(range(min(limit, len(dataset)))):
        prompt = row["prompt"]
        question = next(
            (m["content"] for m in reversed(prompt) if m.get("role") == "user"), prompt[-1]["content"]
        )
        problem = {
            "question": renderers.format_content_as_string(question),
            "answer": str(row.get("answer") or ""),
            "prompt": prompt,
            "task": row.get("task") or "default",
            "info": row.get("info") or {},
            "example_id": row["example_id"],
            "verifiers_args": args,
        }
        rows.append(json.loads(json.dumps(problem, default=str)))
    return rows


def _make_env(problem: dict, ctx: EnvContext) -> Env:
    from posttrain.pipeline.envs.verifiers_rollout import VerifiersEnv

    return VerifiersEnv(load(ctx.spec.variant, problem.get("verifiers_args") or {}), problem, ctx.renderer)


class VerifiersEnvironment(Environment):
    tag = "verifiers"
    score_label = "mean reward (the environment's rubric)"
    noun = "problems"
    takes_verifier = False  # the rubric is the reward

    def problems(self, spec: EnvSpec, cfg: ProblemSettings, data: LoadedData | None) -> ProblemSet:
        if data is not None:
            raise ConfigError(f"env={spec} brings its own dataset; leave dataset= out")
        args = parse_args(getattr(cfg, "verifiers_args", None))
        env = load(spec.variant, args)
        if env.dataset is None and env.eval_dataset is None:
            raise ConfigError(f"env={spec}: the environment has no dataset")
        train_set = env.dataset if env.dataset is not None else env.eval_dataset
        train = _rows(train_set, cfg.max_train_rows, args)
        if env.eval_dataset is not None and env.dataset is not None:
            held_out, eval_source = _rows(env.eval_dataset, n_eval(cfg), args), "its eval dataset"
        else:  # only one split: the last rows are held out (at most half), never trained on
            cut = max(1, min(n_eval(cfg), len(train) // 2))
            train, held_out = train[:-cut], train[-cut:]
            eval_source = f"the last {cut} rows of its dataset, held out"
        info = {
            "source": f"verifiers environment {spec.variant}" + (f" ({args})" if args else ""),
            "eval_source": f"{len(held_out)} rows from {eval_source}",
            "score": "mean rubric reward",
        }
        return ProblemSet(train, held_out, info)

    def prompt(self, problem: dict, ctx: EnvContext) -> list[renderers.Message]:
        return problem["prompt"]

    def max_turns(self, spec: EnvSpec) -> int:
        turns = [env.max_turns for (variant, _), env in _LOADED.items() if variant == spec.variant]
        if not turns:
            return 1
        return turns[0] if turns[0] > 0 else UNBOUNDED_TURNS_ESTIMATE

    def make_env(self, problem: dict, ctx: EnvContext) -> Env:
        return _make_env(problem, ctx)

    def group_builder(self, problem: dict, ctx: EnvContext, group_size: int) -> EnvGroupBuilder:
        return problem_group(_make_env, problem, ctx, group_size, self.tag)

    def row(self, index: int, problem: dict, episode: Episode) -> RLExample:
        """The rubric's reward as the row's; `correct` when it is positive; the turns in the transcript."""
        from posttrain.pipeline.envs.verifiers_rollout import VerifiersEnv
        from posttrain.pipeline.results import RLExample

        env = episode.env
        assert isinstance(env, VerifiersEnv)
        state = env.state or {}
        completion = state.get("completion") or []
        said = [str(m.get("content") or "") for m in completion if m.get("role") == "assistant"]
        reward = float(state.get("reward") or 0.0)
        answer = env.vf_env.parser.parse_answer(completion) if completion else None
        record = RLExample(index, problem["question"], problem["answer"], "\n".join(said), answer, reward > 0)
        record.reward = reward
        record.details = {"metrics": state.get("metrics") or {}}
        turns: list[dict[str, Any]] = []
        for m in completion:  # each model turn with what the environment answered to it
            text = str(m.get("content") or "")
            if m.get("role") == "assistant":
                turns.append({"turn": len(turns) + 1, "player": text, "env": ""})
            elif turns:
                turns[-1]["env"] = f"{turns[-1]['env']}\n{text}".strip()
        if len(turns) > 1 or any(t["env"] for t in turns):
            record.transcript = turns
        if state.get("error") is not None:
            record.error = f"the rollout stopped: {type(state['error']).__name__}: {state['error']}"
        return record

    def score(self, rows: Sequence[RLExample]) -> float:
        return mean_score(rows)
