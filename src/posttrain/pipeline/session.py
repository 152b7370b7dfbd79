"""The part of a run that talks to the service: the service up (a local engine started), the models checked, the
renderer and learning rate chosen, the method prepared; then the base evaluation, the training loop(s) with their
progress bars, the final checkpoint, and the trained model's evaluation. A plan (`dry_run=true`) goes as far as
the method's token budget and, locally, a probe of this machine's speed."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import AsyncIterator, Coroutine, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from posttrain.config.renderers import resolve_renderer
from posttrain.errors import UserError
from posttrain.lean_imports import skip_unused_sklearn
from posttrain.pipeline import results, tracking
from posttrain.pipeline.console import CONSOLE
from posttrain.pipeline.methods import Method, RunContext, TrainingStage, training_stages
from posttrain.pipeline.methods.choice import default_learning_rate
from posttrain.pipeline.methods.length import too_short
from posttrain.pipeline.setup import backend, plan, preflight, resume, template_check
from posttrain.pipeline.state import Checkpoint, Chosen, RunState

if TYPE_CHECKING:
    import tinker

say = CONSOLE.say
# The SDK's session tags (tinker.lib.internal_client_holder) and the tag the local engine reads a seed from.
TAGS_VARIABLE, SEED_TAG = "TINKER_TAGS", "seed="


async def plan_run(state: RunState, method: Method) -> dict[str, Any]:
    cfg = state.cfg
    if state.backend == "tinker":  # tokens and published prices: nothing is asked of the service
        ctx = context(state, None, cfg.base_url)
        template_check.check_run(ctx, method)
        method.prepare(ctx)
        budget = method.token_budget()
        return {
            "tokens": budget.as_dict(),
            "tinker_cost": plan.tinker_price(cfg.model_name, budget),
            **_short_warning(state, budget),
        }
    started = time.monotonic()
    async with prepared(state, method) as ctx:
        budget = method.token_budget()
        startup = time.monotonic() - started
        say("plan: measuring this machine's speed (a training step of a few sequences, a few samples)")
        rates = await plan.probe_rates(ctx.service, cfg.model_name, budget, cfg.lora_rank)
    seconds = plan.estimated_seconds(budget, rates)
    return {
        "tokens": budget.as_dict(),
        "rates": rates,
        "seconds": round(seconds + startup),
        "startup": startup,
        **_short_warning(state, budget),
    }


def _short_warning(state: RunState, budget: plan.TokenBudget) -> dict[str, str]:
    """The plan's `warning` when the run's optimizer steps are fewer than its method needs to move its metric."""
    warning = too_short(state.method, budget.train_steps, state.length)
    return {"warning": warning} if warning else {}


@asynccontextmanager
async def prepared(state: RunState, method: Method) -> AsyncIterator[RunContext]:
    """The service up (a local engine started), the models checked, the method prepared on it."""
    # A method may need more models served than the one it trains (e.g. a distillation teacher).
    extra_models = list(method.extra_models)
    # The SDK and the tokenizer load (torch's and transformers' imports: seconds, only once every check has passed)
    # while a local engine starts, not after it is up.
    tokenizer = asyncio.ensure_future(asyncio.to_thread(_client_side, state.cfg.model_name))
    with seeded_sessions(state.cfg.seed), _awaited_at_exit(tokenizer):
        async with backend.service_url(state.cfg, state.backend, state.log_path, say, extra_models) as url:
            if backend.remote_url(state.cfg, state.backend) is None:  # a service we do not start was checked
                models = [state.cfg.model_name, *extra_models]
                await asyncio.to_thread(backend.check_served_models, url, models, state.backend)
            await tokenizer
            import tinker

            service = tinker.ServiceClient(base_url=url)
            ctx = context(state, service, url)
            template_check.check_run(ctx, method)  # lineup models: renderer == the model's chat template
            method.prepare(ctx)
            yield ctx
            await _finish_session(service)


def _client_side(model_name: str) -> Any:
    skip_unused_sklearn()
    import tinker  # noqa: F401 - imported here for its time (torch), used by the caller

    return preflight.load_tokenizer(model_name)


@contextlib.contextmanager
def _awaited_at_exit(future: asyncio.Future[Any]) -> Iterator[None]:
    """A side task whose failure, when the block ended first for another reason, is not reported twice."""
    try:
        yield
    finally:
        future.add_done_callback(lambda f: f.cancelled() or f.exception())


@contextlib.contextmanager
def seeded_sessions(seed: int) -> Iterator[None]:
    """Every service session of the run (ours and the cookbook loops', which create their own clients) is tagged
    `seed=N`: the SDK sends the tags of TINKER_TAGS when a session starts, and the local engine seeds the LoRA
    initialisation and rollouts that ask for no seed from it (engine/seeding.py). Tinker keeps the tag, no more."""
    previous = os.environ.get(TAGS_VARIABLE)
    tags = [t for t in (previous or "").split(",") if t and not t.startswith(SEED_TAG)]
    os.environ[TAGS_VARIABLE] = ",".join([*tags, f"{SEED_TAG}{seed}"])
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(TAGS_VARIABLE, None)
        else:
            os.environ[TAGS_VARIABLE] = previous


# Seconds a finished run waits for its session to close; the results are written by then.
SESSION_CLOSE_TIMEOUT = 10.0


async def _finish_session(service: Any) -> None:
    """Mark the finished run's session done (the SDK's `close`), so the service ends it now rather than when its
    heartbeats stop, and no heartbeat thread outlives the run (a library caller's process goes on). Only after
    success: a stopped or failed run exits at once, as it did, and its process ends the heartbeats."""
    try:
        await asyncio.wait_for(service.close("success"), SESSION_CLOSE_TIMEOUT)
    except Exception as e:  # noqa: BLE001 - the run is done and its results written; this is housekeeping
        logging.getLogger(__name__).warning("session close: %s: %s", type(e).__name__, e)


async def train_and_evaluate(state: RunState, method: Method) -> results.Outcome:
    cfg = state.cfg
    setup_started = time.monotonic()
    async with prepared(state, method) as ctx:
        # The service up, the tokenizer loaded, the method prepared: what the run spends before its first request.
        state.durations["setup"] = round(time.monotonic() - setup_started, 2)
        service = ctx.service
        state.budget = method.token_budget()
        if warning := too_short(state.method, state.budget.train_steps, state.length):
            say(warning)  # before anything is trained or evaluated

        # Evaluate the base model and the trained model the same way.
        base_rows, state.baseline = (
            resume.earlier_base_evaluation(state.store, state.run_name, say) if cfg.resume else (None, None)
        )
        # A resumed run without a guard set has every base-model answer it needs already.
        base_client = None
        if base_rows is None or state.guard is not None:
            base_client = await service.create_sampling_client(base_model=cfg.model_name)
        if base_rows is None:
            with state.phase("base_eval"):
                base_rows, state.baseline = await method.evaluate(base_client, "base model")
            state.store.write_jsonl(results.BASE_FILE, base_rows)  # kept for a resumed run
        say(f"base model: {method.score_text(state.baseline)}")
        base_guard = await guard_rows(state, ctx, base_client, "base model") if base_client else None

        state.stages = training_stages(method, ctx)
        with state.phase("training"), tracking.wandb_environment(tracking.wandb_mode(), group=state.run_name):
            for number, stage in enumerate(state.stages, 1):
                await run_stage(state, stage, number)
        state.checkpoint = final_checkpoint(state.stages[-1].log_path)
        trained_client = await service.create_sampling_client(model_path=state.checkpoint.sampler_path)

        with state.phase("trained_eval"):
            trained_rows, state.trained = await method.evaluate(trained_client, "trained model")
        say(f"trained model: {method.score_text(state.trained)}")
        trained_guard = await guard_rows(state, ctx, trained_client, "trained model")
    dataset, sizes, extra = method.describe()
    guard = state.guard
    measured = (
        (guard.name, guard.source, base_guard, trained_guard)
        if guard and base_guard and trained_guard
        else None
    )
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
        guard=measured,
    )


async def guard_rows(
    state: RunState, ctx: RunContext, client: tinker.SamplingClient, label: str
) -> list[Any] | None:
    """The guard set scored by `client`, as a phase of its own; None without a guard set."""
    from posttrain.pipeline.evaluation.guard import evaluate_guard

    if state.guard is None:
        return None
    with state.phase("guard_base" if label == "base model" else "guard_trained"):
        rows = await evaluate_guard(client, state.guard, ctx.renderer, state.cfg.eval_concurrency, label)
    return [r.to_dict() for r in rows]


async def run_stage(state: RunState, stage: TrainingStage, number: int) -> None:
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
        while True:
            try:
                await with_progress(stage.start(), stage.log_path / "metrics.jsonl", stage.total_steps, desc)
                break
            except Exception as exc:
                if not (state.cfg.resume and resume.set_aside_damaged_checkpoint(stage.log_path, exc, say)):
                    raise
        if stage.after is not None:
            await stage.after()


async def with_progress(
    loop: Coroutine[Any, Any, Any], metrics_file: Path, total_steps: int, desc: str = "training"
) -> None:
    follower = asyncio.create_task(CONSOLE.follow_training(metrics_file, total_steps, desc))
    try:
        await loop
    finally:
        follower.cancel()
        await asyncio.gather(follower, return_exceptions=True)


def context(state: RunState, service: tinker.ServiceClient | None, url: str | None) -> RunContext:
    from tinker_cookbook import renderers

    cfg = state.cfg
    renderer_name, renderer_source = resolve_renderer(cfg.model_name, cfg.renderer_name)
    say(f"renderer: {renderer_name} ({renderer_source})")
    if cfg.learning_rate:
        lr, lr_source = cfg.learning_rate, "explicit"
    else:
        lr, lr_source = default_learning_rate(cfg.model_name, state.method)
    state.chosen = Chosen(renderer_name, renderer_source, lr, lr_source)
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


def final_checkpoint(log_path: Path) -> Checkpoint:
    """The last training loop's final sampler checkpoint: the trained model."""
    from tinker_cookbook import checkpoint_utils

    record = checkpoint_utils.get_last_checkpoint(str(log_path), required_key="sampler_path")
    if record is None or not record.sampler_path:
        raise UserError(
            f"training finished without a final sampler checkpoint in {log_path}/checkpoints.jsonl"
        )
    return Checkpoint(record.sampler_path)
