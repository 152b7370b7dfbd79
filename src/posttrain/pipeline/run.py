"""One run, in the order of the user's guide: credentials, data, recipe, baseline, training, evaluation, results.

Nothing is spent before the settings, credentials and data pass their checks and the training method has
accepted them. From then on, `results/` gets what was obtained even when the run stops part-way (a summary
with `status: failed` and the error).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from posttrain.config.run import RunSettings
from posttrain.errors import PreflightError, UserError
from posttrain.pipeline import finish, results, session, tracking
from posttrain.pipeline.console import CONSOLE
from posttrain.pipeline.data.sources import load_run_data
from posttrain.pipeline.evaluation.guard import GuardSet, load_guard
from posttrain.pipeline.methods import Method, length, method_class
from posttrain.pipeline.methods.choice import choose_task
from posttrain.pipeline.settings import method_config
from posttrain.pipeline.setup import backend, plan, preflight, resume
from posttrain.pipeline.state import RunState

say = CONSOLE.say


def run(train_config: RunSettings) -> dict[str, Any]:
    """A whole run of `train_config` (a checked TrainConfig); returns summary.json's content."""
    started = time.monotonic()
    CONSOLE.verbose = train_config.verbose
    # Getting started: the .env file and the credentials the backend needs.
    preflight.load_env()
    where = backend.choose_backend(train_config)
    for note in preflight.check_credentials(where):
        say(f"preflight: {note}")
    res = results.ResultsDir(train_config.results_dir)
    res.check_usable()

    # Data preparation, then choosing the recipe; the method checks that the two fit.
    recipe = choose_recipe(train_config, where)
    cfg, task, method = recipe.cfg, recipe.task, recipe.method
    if cfg.dry_run:
        return _dry_run(cfg, where, task, method, recipe.length)

    state = RunState(
        cfg, make_run_name(cfg, task), where, task, res, length=recipe.length, guard=recipe.guard
    )
    if cfg.resume:
        resume.check_resumable(res, state.run_name)
    with res.single_writer(state.run_name) as died:
        if died:
            say(f"results: {died} ended without finishing; this run takes {res.path} over")
        return _train_and_write(state, method, started)


@dataclass(frozen=True)
class Recipe:
    """What the settings and the data came to: the method (which accepted both) and its own config."""

    cfg: RunSettings  # the method's own config (e.g. SFTConfig)
    task: str
    method: Method
    length: length.Length
    guard: GuardSet | None


def choose_recipe(train_config: Any, where: preflight.Backend, for_training: bool = True) -> Recipe:
    """The data loaded, the method chosen and configured on it, the models it needs checked on the backend
    (`for_training=False`: for an evaluation only, which takes a given evaluation set whole)."""
    data = load_run_data(train_config, for_training)
    for each in (data, *data.others) if data is not None else ():
        say(
            f"data: {each.source}: {each.format} format, {len(each.train):,} training rows, "
            f"{len(each.eval):,} evaluation rows ({each.eval_source})"
        )
        for note in each.notes:
            say(f"data: {note}")
    # The guard set (did training break something else?), checked now: a bad file stops the run before it costs.
    guard_set = load_guard(train_config, data.train if data is not None else [])
    if guard_set is not None:
        say(
            f"guard: {guard_set.name}, {guard_set.source}; scored for both models (seconds; guard=false: off)"
        )
    task, why = choose_task(train_config, data)
    if train_config.task == "auto":
        say(f"task: {task} ({why})")
    cfg = method_config(train_config, task)
    # num_epochs and batch_size not given: chosen for the data size and the method (recorded in summary.json).
    cfg, run_length = length.resolve(cfg, task, data)
    if note := run_length.note():
        say(note)
    method = method_class(task)(cfg, data)
    if warning := backend.check_models(cfg, where, [cfg.model_name, *method.extra_models]):
        say(f"plan: warning: {warning}; planning offline (nothing is spent either way)")
    return Recipe(cfg, task, method, run_length, guard_set)


def _train_and_write(state: RunState, method: Method, started: float) -> dict[str, Any]:
    """Training and evaluation; results/ gets what was obtained even when the run stops part-way."""
    cfg, res = state.cfg, state.store
    if not cfg.resume:
        res.prepare(state.run_name)
    state.log_path.mkdir(parents=True, exist_ok=True)
    say(f"run: {state.run_name} ({state.method}, backend {state.backend}); logs in {state.log_path}")
    if not cfg.verbose:
        say(f"library output (warnings, retries, per-step tables): {state.log_path / 'console.log'}")
    with CONSOLE.capture(state.log_path / "console.log"), tracking.own_service():
        try:
            outcome = asyncio.run(session.train_and_evaluate(state, method))
            state.durations["total"] = round(time.monotonic() - started, 2)
            return finish.write_results(state, outcome)
        except (UserError, KeyboardInterrupt, Exception) as exc:
            full = results.no_space(exc, res.path)
            one_line = full or backend.refused(exc, state.log_path / "console.log")
            try:
                finish.write_partial(state, one_line or exc)
            except OSError:
                if full is None:
                    raise  # with a full disk, the summary of the failure is what cannot be written
            if not isinstance(exc, PreflightError):  # stopped before training: nothing to continue
                say(f"to continue this run from its last checkpoint: {resume.resume_command(state.run_name)}")
            if one_line is not None:
                raise one_line from None
            raise


def _dry_run(
    cfg: RunSettings, where: preflight.Backend, task: str, method: Method, run_length: length.Length
) -> dict[str, Any]:
    """Everything up to training, then the plan: sizes, tokens, and the cost (Tinker) or time (local)."""
    # Logs of a dry run go beside, not into, results/: nothing there is moved or written. They are removed when
    # the plan ends, however it ends (a plan is asked for again and again; each would leave a folder behind),
    # except a failed plan's engine log: an engine error says "see .../engine.log", and that file must be there.
    root = Path(tempfile.mkdtemp(prefix="posttrain-plan-"))
    kept: Path | None = None
    try:
        store = results.ResultsDir(root)
        state = RunState(cfg, make_run_name(cfg, task), where, task, store, length=run_length)
        state.log_path.mkdir(parents=True)
        say(f"plan: {task} on backend {where} (nothing is trained; logs in {state.log_path} until it ends)")
        try:
            with CONSOLE.capture(state.log_path / "console.log"):
                outcome = asyncio.run(session.plan_run(state, method))
        except Exception:
            if (state.log_path / "engine.log").is_file():
                kept = state.log_path / "engine.log"
                say(f"plan: failed; the local engine's log is kept: {kept}")
            raise
    finally:
        _remove_all_but(root, kept)
    for line in plan.plan_lines(outcome):
        say(f"plan: {line}")
    return {"dry_run": True, "method": task, "backend": where, **outcome}


def _remove_all_but(root: Path, kept: Path | None) -> None:
    """`root` and everything in it, but `kept` (a file under it) and the folders that lead to it."""
    if kept is None:
        shutil.rmtree(root, ignore_errors=True)
        return
    for child in root.iterdir():
        if child == kept:
            continue
        if kept.is_relative_to(child):
            _remove_all_but(child, kept)
        elif child.is_dir() and not child.is_symlink():
            shutil.rmtree(child, ignore_errors=True)
        else:
            child.unlink(missing_ok=True)


def make_run_name(cfg: RunSettings, task: str) -> str:
    if cfg.run_name:
        return cfg.run_name
    model = cfg.model_name.rstrip("/").rsplit("/", 1)[-1].lower().replace(".", "-")
    return f"{task}-{model}-{dt.datetime.now().strftime('%Y%m%d-%H%M%S')}"
