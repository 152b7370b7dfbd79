"""One run, in the order of the user's guide: credentials, data, recipe, baseline, training, evaluation, results.

Nothing is spent before the settings, credentials and data pass their checks and the training method has
accepted them. From then on, `results/` gets what was obtained even when the run stops part-way (a summary
with `status: failed` and the error).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime as dt
import tempfile
import time
from collections.abc import AsyncIterator, Coroutine, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from posttrain.config import TrainConfig, check_method_settings, config_to_dict, data_sources
from posttrain.errors import ConfigError, PreflightError, UserError
from posttrain.pipeline import results, tracking
from posttrain.pipeline.console import CONSOLE
from posttrain.pipeline.data import LoadedData, load_data
from posttrain.pipeline.methods import (
    METHODS,
    Method,
    RunContext,
    TrainingStage,
    method_class,
    training_stages,
)
from posttrain.pipeline.setup import backend, plan, preflight, resume, template_check
from posttrain.util import PACKAGE_DATA, read_jsonl, redact

if TYPE_CHECKING:
    import tinker

DEFAULT_SFT_DATA = PACKAGE_DATA / "default_sft.jsonl"


@dataclass
class RunState:
    """What is known so far; written to summary.json even when the run stops part-way."""

    cfg: TrainConfig
    run_name: str
    backend: str
    task_type: str
    store: results.ResultsDir
    durations: dict[str, float] = field(default_factory=dict)
    tinker_run_id: str | None = None
    sampler_path: str | None = None
    baseline: float | None = None
    trained: float | None = None
    renderer_name: str = ""
    renderer_source: str = ""
    learning_rate: float | None = None
    lr_source: str = ""
    budget: plan.TokenBudget | None = None
    stages: list[TrainingStage] = field(default_factory=list)

    @property
    def log_path(self) -> Path:
        return self.store.log_dir(self.run_name)

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        start = time.monotonic()
        try:
            yield
        finally:
            self.durations[name] = round(time.monotonic() - start, 2)


say = CONSOLE.say


def run(cfg: TrainConfig) -> dict[str, Any]:
    started = time.monotonic()
    CONSOLE.verbose = cfg.verbose
    # Getting started: the .env file and the credentials the backend needs.
    preflight.load_env()
    where = backend.choose_backend(cfg)
    for note in preflight.check_credentials(where):
        say(f"preflight: {note}")
    res = results.ResultsDir(cfg.results_dir)
    res.check_usable()

    # Data preparation, then choosing the recipe; the method checks that the two fit.
    data = _load_data(cfg)
    task = choose_task(cfg, data)
    if cfg.task == "auto":
        say(f"task: {task} ({_auto_task(cfg, data)[1]})")
    method = method_class(task)(cfg, data)
    if url := backend.remote_url(cfg, where):
        _check_service(cfg, where, url, [cfg.model_name, *method.extra_models])
    elif where == "local":
        backend.check_local_model(cfg)

    if cfg.dry_run:
        return _dry_run(cfg, where, task, method)

    state = RunState(cfg, make_run_name(cfg, task), where, task, res)
    if cfg.resume:
        resume.check_resumable(state.store, state.run_name)
    else:
        res.prepare(state.run_name)
    state.log_path.mkdir(parents=True, exist_ok=True)
    say(f"run: {state.run_name} ({task}, backend {where}); logs in {state.log_path}")
    if not cfg.verbose:
        say(f"library output (warnings, retries, per-step tables): {state.log_path / 'console.log'}")
    with CONSOLE.capture(state.log_path / "console.log"):
        try:
            outcome = asyncio.run(_train_and_evaluate(state, method))
            state.durations["total"] = round(time.monotonic() - started, 2)
            return _write_results(state, outcome)
        except (UserError, KeyboardInterrupt, Exception) as exc:
            _write_partial(state, exc)
            if not isinstance(exc, PreflightError):  # stopped before training: nothing to continue
                say(f"to continue this run from its last checkpoint: {resume.resume_command(state.run_name)}")
            raise


def _check_service(cfg: TrainConfig, where: preflight.Backend, url: str, models: list[str]) -> None:
    """A service the run does not start must answer and offer every model the run needs (its own list). A Tinker
    plan needs no service: offline, it checks the models against the cookbook's table and goes on."""
    try:
        preflight.check_reachable(url)
    except PreflightError as exc:
        if not (cfg.dry_run and where == "tinker"):
            raise
        say(f"plan: warning: {exc}; planning offline (nothing is spent either way)")
        for name in dict.fromkeys(models):
            preflight.check_model(name, "tinker", None)
        return
    backend.check_served_models(cfg.base_url, models, where)


def _dry_run(cfg: TrainConfig, where: preflight.Backend, task: str, method: Method) -> dict[str, Any]:
    """Everything up to training, then the plan: sizes, tokens, and the cost (Tinker) or time (local)."""
    # Logs of a dry run go beside, not into, results/: nothing there is moved or written.
    store = results.ResultsDir(tempfile.mkdtemp(prefix="posttrain-plan-"))
    state = RunState(cfg, make_run_name(cfg, task), where, task, store)
    state.log_path.mkdir(parents=True)
    say(f"plan: {task} on backend {where} (nothing is trained; logs in {state.log_path})")
    with CONSOLE.capture(state.log_path / "console.log"):
        outcome = asyncio.run(_plan(state, method))
    for line in plan.plan_lines(outcome):
        say(f"plan: {line}")
    return {"dry_run": True, "task_type": task, "backend": where, **outcome}


async def _plan(state: RunState, method: Method) -> dict[str, Any]:
    cfg = state.cfg
    if state.backend == "tinker":  # tokens and published prices: nothing is asked of the service
        ctx = _context(state, None, cfg.base_url)
        template_check.check_run(ctx, method)
        method.prepare(ctx)
        budget = method.token_budget()
        return {"tokens": budget.as_dict(), "tinker_cost": plan.tinker_price(cfg.model_name, budget)}
    started = time.monotonic()
    async with _prepared(state, method) as ctx:
        budget = method.token_budget()
        startup = time.monotonic() - started
        say("plan: measuring this machine's speed (one training step, a few samples)")
        rates = await plan.probe_rates(ctx.service, cfg.model_name, budget, cfg.lora_rank)
    seconds = plan.estimated_seconds(budget, rates)
    return {
        "tokens": budget.as_dict(),
        "rates": rates,
        "seconds": round(seconds + startup),
        "startup": startup,
    }


def _load_data(cfg: TrainConfig) -> LoadedData | None:
    if cfg.dataset is None and cfg.env:
        return None  # the environment generates its own problems
    # One dataset; with several distillation teachers, one per teacher (the first carries the others).
    sources = data_sources(cfg)
    loaded = []
    for source in sources:
        data = load_data(
            source.dataset or str(DEFAULT_SFT_DATA),
            dataset_config=source.dataset_config,
            split=source.dataset_split,
            eval_dataset=source.eval_dataset,
            eval_split=source.eval_split,
            max_train_rows=source.max_train_rows,
            max_eval_rows=source.max_eval_rows,
            seed=42,
        )
        say(
            f"data: {data.source}: {data.format} format, {len(data.train):,} training rows, "
            f"{len(data.eval):,} evaluation rows ({data.eval_source})"
        )
        for note in data.notes:
            say(f"data: {note}")
        loaded.append(data)
    return dataclasses.replace(loaded[0], others=tuple(loaded[1:])) if len(loaded) > 1 else loaded[0]


def choose_task(cfg: TrainConfig, data: LoadedData | None) -> str:
    """task=auto: a teacher means distillation, a system prompt prompt distillation, `env=` RL; else the first
    method that trains on the data's format. The method's own settings are then checked against the choice."""
    if cfg.task != "auto":
        return cfg.task
    task, _ = _auto_task(cfg, data)
    check_method_settings(cfg, task)
    return task


def _auto_task(cfg: TrainConfig, data: LoadedData | None) -> tuple[str, str]:
    """The method task=auto picks, and why."""
    if cfg.teacher_model is not None or cfg.distillation_mode is not None:
        return "distillation", "teacher_model is set"
    if cfg.system_prompt is not None:
        return "prompt_distillation", "system_prompt is set"
    if cfg.grader_model is not None or cfg.grader_mode is not None:
        return "rubric", "grader_model is set" if cfg.grader_model is not None else "grader_mode is set"
    if cfg.env:
        return "rl", f"env={cfg.env}"
    if data is None:
        return "sft", "no dataset: the default data"
    for name, entry in METHODS.items():
        if data.format in entry.formats:
            return name, f"{data.format} data"
    raise ConfigError(
        f"{data.source}: no training method in posttrain takes {data.format} data yet "
        f"(task= can be {', '.join(METHODS)})"
    )


def make_run_name(cfg: TrainConfig, task: str) -> str:
    if cfg.run_name:
        return cfg.run_name
    model = cfg.model_name.rstrip("/").rsplit("/", 1)[-1].lower().replace(".", "-")
    return f"{task}-{model}-{dt.datetime.now().strftime('%Y%m%d-%H%M%S')}"


def default_learning_rate(model_name: str, task: str) -> tuple[float, str]:
    from tinker_cookbook.hyperparam_utils import get_lr

    try:
        lr = get_lr(model_name)
    except Exception:  # noqa: BLE001 - models outside the cookbook's calibrated families
        # rlhf: this is its SFT and reward-model stages' rate; its RL stage halves it, as RL does here.
        return (
            5e-4 if task in ("sft", "rlhf") else 2e-4
        ), "posttrain default for small models outside the cookbook's table"
    if task in ("rl", "rubric"):
        return lr / 2, "tinker_cookbook.hyperparam_utils.get_lr / 2 for RL"
    return lr, "tinker_cookbook.hyperparam_utils.get_lr"


@asynccontextmanager
async def _prepared(state: RunState, method: Method) -> AsyncIterator[RunContext]:
    """The service up (a local engine started), the models checked, the method prepared on it."""
    # The SDK and the cookbook load torch (seconds): only once every check has passed.
    import tinker

    # A method may need more models served than the one it trains (e.g. a distillation teacher).
    extra_models = list(method.extra_models)
    async with backend.service_url(state.cfg, state.backend, state.log_path, say, extra_models) as url:
        if backend.remote_url(state.cfg, state.backend) is None:  # a service we do not start was checked before
            models = [state.cfg.model_name, *extra_models]
            await asyncio.to_thread(backend.check_served_models, url, models, state.backend)
        service = tinker.ServiceClient(base_url=url)
        ctx = _context(state, service, url)
        template_check.check_run(ctx, method)  # lineup models: renderer == the model's chat template
        method.prepare(ctx)
        yield ctx


async def _train_and_evaluate(state: RunState, method: Method) -> results.Outcome:
    cfg = state.cfg
    async with _prepared(state, method) as ctx:
        service = ctx.service
        state.budget = method.token_budget()

        # Evaluate the base model and the trained model the same way.
        base_rows, state.baseline = (
            resume.earlier_base_evaluation(state.store, state.run_name, say) if cfg.resume else (None, None)
        )
        if base_rows is None:
            base_client = await service.create_sampling_client_async(base_model=cfg.model_name)
            with state.phase("base_eval"):
                base_rows, state.baseline = await method.evaluate(base_client, "base model")
            state.store.write_jsonl(results.BASE_FILE, base_rows)  # kept for a resumed run
        say(f"base model: {method.score_text(state.baseline)}")

        state.stages = training_stages(method, ctx)
        with state.phase("training"), tracking.wandb_environment(tracking.wandb_mode(), group=state.run_name):
            for number, stage in enumerate(state.stages, 1):
                await _run_stage(state, stage, number)
        _record_final_checkpoint(state, state.stages[-1].log_path)
        trained_client = await service.create_sampling_client_async(model_path=state.sampler_path)

        with state.phase("trained_eval"):
            trained_rows, state.trained = await method.evaluate(trained_client, "trained model")
        say(f"trained model: {method.score_text(state.trained)}")
    dataset, sizes, extra = method.describe()
    return results.Outcome(
        method.metric,
        base_rows,
        trained_rows,
        state.baseline,
        state.trained,
        dataset,
        sizes,
        extra,
        score_label=method.score_label,
    )


async def _run_stage(state: RunState, stage: TrainingStage, number: int) -> None:
    """One training loop as a phase: its line, its progress bar; a resumed run continues it or skips it."""
    several = len(state.stages) > 1
    label = f"training stage {number}/{len(state.stages)}: {stage.name}" if several else "training"
    if state.cfg.resume:
        if several and resume.stage_finished(stage.log_path):
            say(f"{label}: finished before the interruption (kept)")
            return
        resume.forget_steps_after_last_checkpoint(stage.log_path, say)
    say(f"{label}: {stage.total_steps} steps" + (f" (logs in {stage.log_path})" if several else ""))
    stage.log_path.mkdir(parents=True, exist_ok=True)
    with state.phase(f"training_{stage.name}") if several else contextlib.nullcontext():
        desc = stage.name if several else "training"
        await _with_progress(stage.start(), stage.log_path / "metrics.jsonl", stage.total_steps, desc)
        if stage.after is not None:
            await stage.after()


async def _with_progress(
    loop: Coroutine[Any, Any, Any], metrics_file: Path, total_steps: int, desc: str = "training"
) -> None:
    follower = asyncio.create_task(CONSOLE.follow_training(metrics_file, total_steps, desc))
    try:
        await loop
    finally:
        follower.cancel()
        await asyncio.gather(follower, return_exceptions=True)


def _context(state: RunState, service: tinker.ServiceClient | None, url: str | None) -> RunContext:
    from tinker_cookbook import renderers

    cfg = state.cfg
    renderer_name, renderer_source = preflight.resolve_renderer(cfg.model_name, cfg.renderer_name)
    say(f"renderer: {renderer_name} ({renderer_source})")
    state.renderer_name, state.renderer_source = renderer_name, renderer_source
    if cfg.learning_rate:
        lr, state.lr_source = cfg.learning_rate, "explicit"
    else:
        lr, state.lr_source = default_learning_rate(cfg.model_name, state.task_type)
    state.learning_rate = lr
    return RunContext(
        cfg=cfg,
        run_name=state.run_name,
        log_path=state.log_path,
        service=service,
        base_url=url,
        renderer_name=renderer_name,
        renderer=renderers.get_renderer(renderer_name, tokenizer=preflight.load_tokenizer(cfg.model_name)),
        learning_rate=lr,
        wandb_project=tracking.resolve_project(cfg.wandb_project),
        say=say,
    )


def _record_final_checkpoint(state: RunState, log_path: Path) -> None:
    from tinker_cookbook import checkpoint_utils

    record = checkpoint_utils.get_last_checkpoint(str(log_path), required_key="sampler_path")
    if record is None or not record.sampler_path:
        raise UserError(
            f"training finished without a final sampler checkpoint in {log_path}/checkpoints.jsonl"
        )
    state.sampler_path = record.sampler_path
    state.tinker_run_id = record.sampler_path[len("tinker://") :].split("/", 1)[0]


def _settings(state: RunState) -> dict[str, Any]:
    """Every setting as used: the configuration plus what was chosen for it."""
    return {
        **config_to_dict(state.cfg),
        "learning_rate": state.learning_rate,
        "learning_rate_source": state.lr_source,
        "wandb_project": tracking.resolve_project(state.cfg.wandb_project),
    }


def _write_results(state: RunState, outcome: results.Outcome) -> dict[str, Any]:
    cfg, res = state.cfg, state.store
    # base_model.jsonl was written when the base evaluation finished (a resumed run keeps it).
    res.write_jsonl(results.TRAINED_FILE, outcome.trained_rows)
    comparison = results.compare_examples(outcome.base_rows, outcome.trained_rows, outcome.kind)

    # Verified W&B logging: the training run's metrics must be in its run files (offline) or on W&B.
    project, mode = tracking.resolve_project(cfg.wandb_project), tracking.wandb_mode()
    # The loop that made the trained model (the last stage where there are several).
    final = state.stages[-1] if state.stages else None
    verification = tracking.verify_wandb(
        final.log_path if final else state.log_path,
        project,
        final.wandb_name if final else state.run_name,
        mode,
    )
    facts = results.RunFacts(
        task_type=state.task_type,
        run_name=state.run_name,
        tinker_run_id=state.tinker_run_id or "",
        log_path=str(state.log_path),
        wandb_url=verification.get("url_or_path") or "",
        model=cfg.model_name,
        backend=f"local ({cfg.base_url})" if state.backend == "local" and cfg.base_url else state.backend,
        renderer=state.renderer_name,
        renderer_source=state.renderer_source,
        hyperparameters=_settings(state),
        durations=state.durations,
        checkpoint_path=state.sampler_path,
    )
    summary = results.build_summary(facts, outcome, verification, comparison)
    summary["tokens"] = _token_record(state)
    if state.backend == "tinker" and state.budget is not None:
        summary["tinker_cost_estimate"] = plan.tinker_price(cfg.model_name, state.budget)
    try:
        scores = {"baseline": outcome.baseline, "trained": outcome.trained, "verdict": summary["verdict"]}
        summary["wandb_eval_run"] = tracking.log_final_metrics(
            project, state.run_name, scores, wandb_dir=state.log_path, mode=mode
        )
    except Exception as exc:  # noqa: BLE001 - tracking trouble must not lose the results
        summary["wandb_eval_run"] = {"error": redact(str(exc))[:300]}
    results.write_summary(res, summary)
    metrics_file = (final.log_path if final else state.log_path) / "metrics.jsonl"
    warning = results.write_report(res, summary, comparison, metrics_file)

    say("")
    say(summary["headline"])
    say(
        f"per example: {comparison['improved']} improved, {comparison['regressed']} regressed, "
        f"{comparison['unchanged']} unchanged"
    )
    verified = "verified" if verification["verified"] else "NOT verified"
    say(f"W&B ({verification['mode']}): {verified}: {facts.wandb_url}")
    say(f"results: {res.path}/ (summary.json, base_model.jsonl, trained_model.jsonl, report.md)")
    if warning:
        say("")
        say(warning)
    return summary


def _token_record(state: RunState) -> dict[str, Any]:
    """The token estimate made before training, beside the tokens the training loop reports it trained on."""
    files = [s.log_path / "metrics.jsonl" for s in state.stages] or [state.log_path / "metrics.jsonl"]
    rows = [r for f in files if f.is_file() for r in read_jsonl(f)]
    trained = sum(r["num_tokens"] for r in rows if isinstance(r.get("num_tokens"), int | float))
    return {"estimate": state.budget.as_dict() if state.budget else None, "trained_reported": trained or None}


def _write_partial(state: RunState, exc: BaseException) -> None:
    state.store.write_json(
        results.SUMMARY_FILE,
        {
            "task_type": state.task_type,
            "run_name": state.run_name,
            "status": "failed",
            "error": redact(f"{type(exc).__name__}: {exc}")[:2000],
            "tinker_run_id": state.tinker_run_id,
            "log_path": str(state.log_path),
            "backend": state.backend,
            "baseline": state.baseline,
            "trained": state.trained,
            "durations_seconds": state.durations,
            "hyperparameters": _settings(state),
        },
    )
