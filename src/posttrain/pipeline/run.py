"""One run, start to finish: preflight, data, base evaluation, training (cookbook loop), trained evaluation, results.

Nothing is spent before preflight and data validation pass. Whatever happens after that, `results/` gets what
was obtained so far (a partial summary with the error, if the run fails part-way).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import math
import os
import time
from collections.abc import Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tinker
from tinker_cookbook import checkpoint_utils, renderers
from tinker_cookbook.renderers import TrainOnWhat
from tinker_cookbook.rl import train as rl_train
from tinker_cookbook.supervised import train as sl_train
from tinker_cookbook.supervised.types import ChatDatasetBuilderCommonConfig
from tinker_cookbook.tokenizer_utils import get_tokenizer

from posttrain.config import TrainConfig, config_to_dict
from posttrain.errors import ConfigError, PreflightError, UserError
from posttrain.pipeline import preflight, results, tracking
from posttrain.pipeline.data import LoadedData, default_train_on_what, load_data
from posttrain.pipeline.evaluation import SamplingSettings, evaluate_accuracy, evaluate_nll
from posttrain.pipeline.rl_envs import (
    ANSWER_INSTRUCTION,
    ProblemFileBuilder,
    arithmetic_problems,
    qa_problems,
    reasoning_gym_problems,
    write_problems,
)
from posttrain.pipeline.sft import ConversationFilesBuilder, write_conversations

logger = logging.getLogger(__name__)

DEFAULT_SFT_DATA = Path(__file__).resolve().parent.parent / "data" / "default_sft.jsonl"
LOCAL_API_KEY = "tml-local-engine"
CHAT_FORMATS = {"messages", "prompt_completion", "instruction", "sharegpt"}


@dataclass
class RunState:
    """What is known so far; written to summary.json even when the run stops part-way."""

    cfg: TrainConfig
    run_name: str
    backend: str = "local"
    task_type: str = "sft"
    notes: list[str] = field(default_factory=list)
    durations: dict[str, float] = field(default_factory=dict)
    tinker_run_id: str | None = None
    sampler_path: str | None = None
    baseline: float | None = None
    trained: float | None = None


def _say(message: str) -> None:
    print(preflight.redact(message), flush=True)


def _timed(state: RunState, phase: str):  # noqa: ANN202 - a tiny context manager
    class _Timer:
        def __enter__(self) -> None:
            self.start = time.monotonic()

        def __exit__(self, *exc: object) -> None:
            state.durations[phase] = round(time.monotonic() - self.start, 2)

    return _Timer()


def choose_backend(cfg: TrainConfig) -> str:
    if cfg.backend != "auto":
        return cfg.backend
    if cfg.base_url and not any(h in cfg.base_url for h in ("127.0.0.1", "localhost", "[::1]")):
        return "tinker"
    if os.environ.get("TINKER_API_KEY", "").strip() and cfg.model_name in preflight.TINKER_LINEUP:
        return "tinker"
    return "local"


def choose_task(cfg: TrainConfig, data: LoadedData | None) -> str:
    if cfg.task != "auto":
        task = cfg.task
    elif cfg.env:
        task = "rl"
    elif data is None:
        task = "sft"
    elif data.format in CHAT_FORMATS:
        task = "sft"
    elif data.format == "question_answer":
        task = "rl"
    else:
        task = "dpo"
    if task in ("dpo", "distillation"):
        raise ConfigError(
            f"task={task}: not available yet in posttrain (supported now: sft, rl). "
            + (
                "The data has prompt/chosen/rejected columns (preference pairs)."
                if data and data.format == "preference"
                else ""
            )
        )
    return task


def default_learning_rate(model_name: str, task: str) -> tuple[float, str]:
    from tinker_cookbook.hyperparam_utils import get_lr

    try:
        lr = get_lr(model_name)
        return (lr if task == "sft" else lr / 2), "tinker_cookbook.hyperparam_utils.get_lr" + (
            " / 2 for RL" if task == "rl" else ""
        )
    except Exception:  # noqa: BLE001 - models outside the cookbook's calibrated families
        return (
            5e-4 if task == "sft" else 2e-4
        ), "posttrain default for small models outside the cookbook's table"


def make_run_name(cfg: TrainConfig, task: str) -> str:
    if cfg.run_name:
        return cfg.run_name
    model = cfg.model_name.rstrip("/").rsplit("/", 1)[-1].lower().replace(".", "-")
    return f"{task}-{model}-{dt.datetime.now().strftime('%Y%m%d-%H%M%S')}"


def run(cfg: TrainConfig) -> dict[str, Any]:
    started = time.monotonic()
    preflight.load_env()
    backend = choose_backend(cfg)
    for note in preflight.check_credentials(backend):  # type: ignore[arg-type]
        _say(f"preflight: {note}")
    if backend == "tinker" and cfg.model_name not in preflight.TINKER_LINEUP and cfg.base_url is None:
        preflight.check_model(cfg.model_name, "tinker", None)

    data: LoadedData | None = None
    if cfg.dataset is not None or not cfg.env:
        dataset = cfg.dataset or str(DEFAULT_SFT_DATA)
        data = load_data(
            dataset,
            dataset_config=cfg.dataset_config,
            split=cfg.dataset_split,
            eval_dataset=cfg.eval_dataset,
            eval_split=cfg.eval_split,
            max_train_rows=cfg.max_train_rows,
            max_eval_rows=cfg.max_eval_rows,
            seed=42,
        )
        _say(
            f"data: {data.source}: {data.format} format, {len(data.train):,} training rows, "
            f"{len(data.eval):,} evaluation rows ({data.eval_source})"
        )
        for note in data.notes:
            _say(f"data: {note}")
    task = choose_task(cfg, data)
    state = RunState(cfg=cfg, run_name=make_run_name(cfg, task), backend=backend, task_type=task)
    res = results.ResultsDir(cfg.results_dir)
    res.prepare(state.run_name)
    log_path = res.log_dir(state.run_name)
    log_path.mkdir(parents=True, exist_ok=True)
    _say(f"run: {state.run_name} ({task}, backend {backend}); logs in {log_path}")
    try:
        return asyncio.run(_run(cfg, state, data, res, log_path, started))
    except (UserError, KeyboardInterrupt, Exception) as exc:
        _write_partial(res, state, log_path, exc)
        raise


def _write_partial(res: results.ResultsDir, state: RunState, log_path: Path, exc: BaseException) -> None:
    partial = {
        "task_type": state.task_type,
        "run_name": state.run_name,
        "status": "failed",
        "error": preflight.redact(f"{type(exc).__name__}: {exc}")[:2000],
        "tinker_run_id": state.tinker_run_id,
        "log_path": str(log_path),
        "backend": state.backend,
        "baseline": state.baseline,
        "trained": state.trained,
        "durations_seconds": state.durations,
        "hyperparameters": config_to_dict(state.cfg),
    }
    res.write_json("summary.json", partial)


async def _run(
    cfg: TrainConfig,
    state: RunState,
    data: LoadedData | None,
    res: results.ResultsDir,
    log_path: Path,
    started: float,
) -> dict[str, Any]:
    engine = None
    base_url = cfg.base_url
    if state.backend == "local" and base_url is None:
        from posttrain.engine.launcher import EngineProcess

        os.environ.setdefault("TINKER_API_KEY", LOCAL_API_KEY)
        engine = EngineProcess(models=[cfg.model_name], dtype=cfg.dtype, log_file=log_path / "engine.log")
        with _timed(state, "engine_start"):
            _say(f"engine: starting the local engine with {cfg.model_name} (log: {log_path / 'engine.log'})")
            base_url = await asyncio.to_thread(engine.start)
        _say(f"engine: ready at {base_url}")
    elif state.backend == "local":
        os.environ.setdefault("TINKER_API_KEY", LOCAL_API_KEY)
    try:
        return await _train_and_evaluate(cfg, state, data, res, log_path, base_url, started)
    finally:
        if engine is not None:
            engine.stop()


async def _train_and_evaluate(
    cfg: TrainConfig,
    state: RunState,
    data: LoadedData | None,
    res: results.ResultsDir,
    log_path: Path,
    base_url: str | None,
    started: float,
) -> dict[str, Any]:
    service = tinker.ServiceClient(base_url=base_url)
    try:
        caps = await service.get_server_capabilities_async()
        available = [m.model_name for m in caps.supported_models if m.model_name]
    except Exception as exc:  # noqa: BLE001 - the cloud may be unreachable; the lineup table is the fallback
        if state.backend == "local":
            raise PreflightError(
                f"the engine at {base_url} did not answer get_server_capabilities ({exc})"
            ) from None
        available = None
    preflight.check_model(cfg.model_name, state.backend, available)  # type: ignore[arg-type]
    renderer_name, renderer_source = preflight.resolve_renderer(cfg.model_name, cfg.renderer_name)
    _say(f"renderer: {renderer_name} ({renderer_source})")
    tokenizer = get_tokenizer(cfg.model_name)
    renderer = renderers.get_renderer(renderer_name, tokenizer=tokenizer)
    lr, lr_source = (
        (cfg.learning_rate, "explicit")
        if cfg.learning_rate
        else default_learning_rate(cfg.model_name, state.task_type)
    )
    wandb_mode = tracking.wandb_mode()
    project = cfg.wandb_project or os.environ.get("WANDB_PROJECT") or "posttrain"
    common: dict[str, Any] = dict(
        log_path=str(log_path),
        model_name=cfg.model_name,
        renderer_name=renderer_name,
        learning_rate=lr,
        lora_rank=cfg.lora_rank,
        base_url=base_url,
        save_every=cfg.save_every,
        eval_every=cfg.eval_every,
        wandb_project=project,
        wandb_name=state.run_name,
        max_steps=cfg.max_steps,
    )
    if state.task_type == "sft":
        assert data is not None
        outcome = await _sft(cfg, state, data, service, renderer, renderer_name, common, log_path, wandb_mode)
    else:
        outcome = await _rl(cfg, state, data, service, renderer, renderer_name, common, log_path, wandb_mode)
    base_rows, trained_rows, sizes, dataset_info, extra = outcome

    res.write_jsonl("base_model.jsonl", base_rows)
    res.write_jsonl("trained_model.jsonl", trained_rows)
    comparison = results.compare_examples(base_rows, trained_rows, state.task_type)
    verification = tracking.verify_wandb(log_path, project, state.run_name, wandb_mode)
    wandb_url = verification.get("url_or_path") or ""
    assert state.baseline is not None and state.trained is not None
    state.durations["total"] = round(time.monotonic() - started, 2)
    summary = results.build_summary(
        task_type=state.task_type,
        run_name=state.run_name,
        tinker_run_id=state.tinker_run_id or "",
        log_path=log_path,
        wandb_url=wandb_url,
        baseline=state.baseline,
        trained=state.trained,
        model=cfg.model_name,
        backend=state.backend if base_url is None or state.backend == "tinker" else f"local ({base_url})",
        renderer=renderer_name,
        renderer_source=renderer_source,
        dataset=dataset_info,
        sizes=sizes,
        hyperparameters={
            **config_to_dict(cfg),
            "learning_rate": lr,
            "learning_rate_source": lr_source,
            "wandb_project": project,
        },
        durations=state.durations,
        wandb_verification=verification,
        comparison=comparison,
        checkpoint_path=state.sampler_path,
        extra={"status": "completed", **extra},
    )
    try:
        final = tracking.log_final_metrics(
            project,
            state.run_name,
            {"baseline": state.baseline, "trained": state.trained, "verdict": summary["verdict"]},
            wandb_dir=log_path,
            mode=wandb_mode,
        )
        summary["wandb_eval_run"] = final
    except Exception as exc:  # noqa: BLE001 - tracking trouble must not lose the results
        summary["wandb_eval_run"] = {"error": preflight.redact(str(exc))[:300]}
    results.write_summary(res, summary)
    warning = results.write_report(res, summary, comparison, log_path / "metrics.jsonl")
    _say("")
    _say(summary["headline"])
    _say(
        f"per example: {comparison.get('improved', 0)} improved, {comparison.get('regressed', 0)} regressed, "
        f"{comparison.get('unchanged', 0)} unchanged"
    )
    _say(
        f"W&B ({verification['mode']}): {'verified' if verification['verified'] else 'NOT verified'}: {wandb_url}"
    )
    _say(f"results: {res.path}/ (summary.json, base_model.jsonl, trained_model.jsonl, report.md)")
    if warning:
        _say("")
        _say(warning)
    return summary


async def _train(
    state: RunState,
    log_path: Path,
    service: tinker.ServiceClient,
    wandb_mode: str,
    loop: Coroutine[Any, Any, Any],
) -> tinker.SamplingClient:
    """Run a cookbook training loop, then return a sampler on its final checkpoint."""
    with _timed(state, "training"), tracking.wandb_environment(wandb_mode):
        await loop
    _final_paths(state, log_path)
    return await service.create_sampling_client_async(model_path=state.sampler_path)


def _final_paths(state: RunState, log_path: Path) -> None:
    record = checkpoint_utils.get_last_checkpoint(str(log_path), required_key="sampler_path")
    if record is None or not record.sampler_path:
        raise UserError(
            f"training finished without a final sampler checkpoint in {log_path}/checkpoints.jsonl"
        )
    state.sampler_path = record.sampler_path
    state.tinker_run_id = record.sampler_path[len("tinker://") :].split("/", 1)[0]


async def _sft(
    cfg: TrainConfig,
    state: RunState,
    data: LoadedData,
    service: tinker.ServiceClient,
    renderer: renderers.Renderer,
    renderer_name: str,
    common: dict,
    log_path: Path,
    wandb_mode: str,
):
    train_on_what = cfg.train_on_what or default_train_on_what(data)
    _say(f"train_on_what: {train_on_what}" + ("" if cfg.train_on_what else " (chosen from the data)"))
    write_conversations(log_path / "data" / "train.jsonl", data.train)
    write_conversations(log_path / "data" / "eval.jsonl", data.eval)
    builder = ConversationFilesBuilder(
        common_config=ChatDatasetBuilderCommonConfig(
            model_name_for_tokenizer=cfg.model_name,
            renderer_name=renderer_name,
            max_length=cfg.max_length,
            batch_size=cfg.batch_size,
            train_on_what=TrainOnWhat(train_on_what),
        ),
        train_file=str(log_path / "data" / "train.jsonl"),
        eval_file=str(log_path / "data" / "eval.jsonl") if cfg.eval_every > 0 else None,
        shuffle_seed=cfg.seed,
    )
    eval_datums = builder.datums(data.eval)
    base_client = await service.create_sampling_client_async(base_model=cfg.model_name)
    with _timed(state, "base_eval"):
        base_rows, state.baseline = await evaluate_nll(
            base_client, eval_datums, data.eval, cfg.eval_concurrency, "base model"
        )
    _say(f"base model: held-out NLL {state.baseline:.4f} on {len(eval_datums)} examples")
    config = sl_train.Config(
        **common,
        recipe_name="posttrain_sft",
        dataset_builder=builder,
        lr_schedule=cfg.lr_schedule,
        num_epochs=cfg.num_epochs,
    )
    trained_client = await _train(state, log_path, service, wandb_mode, sl_train.main(config))
    with _timed(state, "trained_eval"):
        trained_rows, state.trained = await evaluate_nll(
            trained_client, eval_datums, data.eval, cfg.eval_concurrency, "trained model"
        )
    _say(f"trained model: held-out NLL {state.trained:.4f}")
    sizes = {"train_rows": len(data.train), "eval_rows": len(data.eval)}
    info = {
        "source": data.source,
        "format": data.format,
        "eval_source": data.eval_source,
        "train_on_what": train_on_what,
    }
    return base_rows, trained_rows, sizes, info, {}


def _rl_problems(cfg: TrainConfig, data: LoadedData | None) -> tuple[list[dict], list[dict], dict]:
    env = cfg.env or "math"
    if env.startswith("reasoning_gym:"):
        task = env.split(":", 1)[1]
        n_train = min(cfg.max_train_rows, max(cfg.batch_size * (cfg.max_steps or 50), 64))
        n_eval = min(cfg.max_eval_rows, max(int(n_train * 0.1), 50))
        # Disjoint seeds give a held-out set drawn from the same generator.
        return (
            reasoning_gym_problems(task, n_train, cfg.seed),
            reasoning_gym_problems(task, n_eval, cfg.seed + 1_000_003),
            {"source": f"reasoning-gym task {task!r} (generated, seeds {cfg.seed} / {cfg.seed + 1_000_003})"},
        )
    if env == "arithmetic":
        n_train = min(cfg.max_train_rows, max(cfg.batch_size * (cfg.max_steps or 50), 64))
        return (
            arithmetic_problems(n_train, cfg.seed),
            arithmetic_problems(min(cfg.max_eval_rows, 100), cfg.seed + 1),
            {"source": "arithmetic: x + y, 0 <= x, y <= 100 (the cookbook's arithmetic task)"},
        )
    if env != "math":
        raise ConfigError(f"env={env}: expected math, arithmetic or reasoning_gym:TASK")
    if data is None or data.format != "question_answer":
        raise ConfigError(
            "env=math needs a dataset with question/answer columns (or problem/solution, ground_truth)"
        )
    return (
        qa_problems(data.train),
        qa_problems(data.eval),
        {"source": data.source, "eval_source": data.eval_source},
    )


async def _rl(
    cfg: TrainConfig,
    state: RunState,
    data: LoadedData | None,
    service: tinker.ServiceClient,
    renderer: renderers.Renderer,
    renderer_name: str,
    common: dict,
    log_path: Path,
    wandb_mode: str,
):
    train_problems, eval_problems, info = _rl_problems(cfg, data)
    if not train_problems or not eval_problems:
        raise ConfigError("RL needs at least one training and one evaluation problem")
    problems_file = log_path / "data" / "train_problems.jsonl"
    write_problems(problems_file, train_problems)
    write_problems(log_path / "data" / "eval_problems.jsonl", eval_problems)
    settings = SamplingSettings(max_tokens=cfg.max_tokens, temperature=cfg.eval_temperature, seed=cfg.seed)
    base_client = await service.create_sampling_client_async(base_model=cfg.model_name)
    with _timed(state, "base_eval"):
        base_rows, state.baseline = await evaluate_accuracy(
            base_client,
            eval_problems,
            renderer,
            ANSWER_INSTRUCTION,
            settings,
            cfg.eval_concurrency,
            "base model",
        )
    _say(f"base model: accuracy {state.baseline:.1%} on {len(eval_problems)} held-out problems")
    n_batches = cfg.max_steps or math.ceil(len(train_problems) / cfg.batch_size) * cfg.num_epochs
    builder = ProblemFileBuilder(
        problems_file=str(problems_file),
        model_name_for_tokenizer=cfg.model_name,
        renderer_name=renderer_name,
        groups_per_batch=cfg.batch_size,
        group_size=cfg.group_size,
        n_batches=n_batches,
        seed=cfg.seed,
    )
    config = rl_train.Config(
        **{k: v for k, v in common.items() if k != "max_steps"},
        recipe_name="posttrain_rl",
        dataset_builder=builder,
        max_tokens=cfg.max_tokens,
        temperature=cfg.temperature,
        loss_fn=cfg.loss_fn,  # type: ignore[arg-type]
        kl_penalty_coef=cfg.kl_penalty_coef,
        max_steps=cfg.max_steps,
    )
    trained_client = await _train(state, log_path, service, wandb_mode, rl_train.main(config))
    with _timed(state, "trained_eval"):
        trained_rows, state.trained = await evaluate_accuracy(
            trained_client,
            eval_problems,
            renderer,
            ANSWER_INSTRUCTION,
            settings,
            cfg.eval_concurrency,
            "trained model",
        )
    _say(f"trained model: accuracy {state.trained:.1%}")
    sizes = {
        "train_problems": len(train_problems),
        "eval_problems": len(eval_problems),
        "group_size": cfg.group_size,
    }
    return (
        base_rows,
        trained_rows,
        sizes,
        {**info, "env": cfg.env or "math"},
        {"answer_instruction": ANSWER_INSTRUCTION},
    )
