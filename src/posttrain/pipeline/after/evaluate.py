"""`posttrain eval`: a model evaluated exactly as a run evaluates it, without training.

The model is a finished run's trained weights (`run_name=`, default the latest run), any saved sampler weights
(`checkpoint=tinker://...`) or a base model (`model_name=` alone). What it is evaluated on is a run's recipe:
the run's own settings by default (so its trained score is reproduced: same rows, same numbers), or the data and
environment given (`env=`, `dataset=`, ... with the train command's evaluation settings). The method's own
evaluation runs (the same graders, sampling settings and rows as in a run), through the run's backend.
`against=` evaluates a second model on the same rows and gives the paired comparison and verdict of a run.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import chz

from posttrain.config.parse import parse_args, setting_key
from posttrain.errors import ConfigError, UserError
from posttrain.pipeline import results
from posttrain.pipeline.after.finished import FinishedRun, find_run
from posttrain.pipeline.console import CONSOLE
from posttrain.pipeline.results.rows import as_dict, json_safe
from posttrain.pipeline.results.summary import judge_improvement
from posttrain.pipeline.run import Recipe, choose_recipe
from posttrain.pipeline.session import prepared
from posttrain.pipeline.settings import TrainConfig, config_to_dict, validate
from posttrain.pipeline.setup import backend, preflight
from posttrain.pipeline.state import RunState

say = CONSOLE.say
BASE = "base"
# Settings that only shape training: given to an evaluation, they would be accepted and change nothing.
TRAINING_ONLY = frozenset(
    {
        "learning_rate",
        "num_epochs",
        "max_steps",
        "batch_size",
        "lora_rank",
        "load_checkpoint_path",
        "lr_schedule",
        "adam_beta1",
        "adam_beta2",
        "adam_eps",
        "group_size",
        "loss_fn",
        "kl_penalty_coef",
        "kl_discount_factor",
        "num_substeps",
        "remove_constant_reward_groups",
        "max_steps_off_policy",
        "num_minibatches",
        "warm_start_steps",
        "save_every",
        "eval_every",
        "wandb_project",
        "wandb_name",
        "guard",
        "guard_dataset",
        "dry_run",
        "resume",
        "run_name",
    }
)
# A run's recipe: any of these given starts from the defaults (with the run's model); eval_dataset= alone keeps the
# run's settings and evaluates on that data instead.
RECIPE_KEYS = frozenset({"task", "env", "dataset"})
# What a model is, whatever it is evaluated on: kept from the run.
MODEL_KEYS = ("model_name", "renderer_name", "backend", "base_url", "dtype", "seed")


@chz.chz
class EvalSettings:
    """posttrain eval: evaluate a run's trained model, a saved checkpoint or a base model, as a run evaluates.

    Every other key=value is a train setting that says what to evaluate on and how (env=, dataset=,
    eval_dataset=, max_eval_rows=, max_tokens=, eval_temperature=, ...; `posttrain train --help`); without
    them the run's own settings are used."""

    run_name: str | None = chz.field(
        default=None, doc="the run whose trained model is evaluated (default: the latest in results_dir)"
    )
    results_dir: str = chz.field(default="results", doc="where the runs are")
    checkpoint: str | None = chz.field(
        default=None, doc="saved sampler weights to evaluate instead (tinker://.../sampler_weights/NAME)"
    )
    against: str | None = chz.field(
        default=None,
        doc="a second model on the same rows, for the paired verdict: base, a run name, or tinker://...",
    )
    out: str | None = chz.field(
        default=None, doc="where the rows and eval.json go (default: results_dir/evals/NAME)"
    )


@dataclass(frozen=True)
class Model:
    """One model to evaluate: sampler weights (`path`) on a base model, or the base model itself."""

    label: str
    base_model: str
    path: str | None = None


def evaluate(argv: list[str]) -> dict[str, Any]:
    """Parse, evaluate, write; returns eval.json's content (with against=, its `verdict`)."""
    own, rest = _split(argv)
    settings = parse_args(EvalSettings, own)
    given = {setting_key(arg) for arg in rest}
    if refused := [key for key in map(setting_key, rest) if key in TRAINING_ONLY]:
        raise ConfigError(f"{refused[0]}= only shapes training; posttrain eval does not train, leave it out")
    run = _run_of(settings, given)
    if run is not None and "model_name" in given:
        raise ConfigError(
            f"model_name= is run {run.name}'s own ({run.model}); leave it out, or leave run_name out"
        )
    train_config = _train_config(run, rest, given)
    model = _model(settings, run, train_config)
    against = _against(settings, model, run)
    out = _out_dir(settings, model)
    return asyncio.run(_evaluate_models(train_config, [model, *([against] if against else [])], out))


def _split(argv: list[str]) -> tuple[list[str], list[str]]:
    """The eval command's own key=value arguments (run_name= names the run to evaluate; --help), and the train
    settings."""
    own_keys = set(chz.chz_fields(EvalSettings)) | {"help", "h", "-h"}
    own = [arg for arg in argv if setting_key(arg) in own_keys]
    return own, [arg for arg in argv if setting_key(arg) not in own_keys]


def _run_of(settings: EvalSettings, given: set[str]) -> FinishedRun | None:
    """The finished run whose model (and, unless others are given, settings) are evaluated; None for a checkpoint
    or a base model named by model_name= alone."""
    if settings.run_name is None and (settings.checkpoint is not None or "model_name" in given):
        return None
    return find_run(settings.results_dir, settings.run_name)


def _train_config(run: FinishedRun | None, rest: list[str], given: set[str]) -> Any:
    """The train settings to build the recipe from: the run's (all of them, or with a new recipe only what its
    model is), then what was given on the command line, checked as the train command checks them."""
    fields = chz.chz_fields(TrainConfig)
    carried: dict[str, Any] = {}
    if run is not None:
        settings = run.settings
        recipe_given = bool(given & RECIPE_KEYS)
        keys = MODEL_KEYS if recipe_given else [k for k in settings if k in fields and k not in TRAINING_ONLY]
        carried = {k: settings[k] for k in keys if k in settings and k in fields}
        carried["model_name"], carried["backend"] = run.model, run.backend
        if not recipe_given:
            carried["task"] = str(run.summary.get("method") or "auto")
    cfg = chz.replace(parse_args(TrainConfig, rest), **{k: v for k, v in carried.items() if k not in given})
    cfg = chz.replace(cfg, guard=False)  # the guard compares a run's two models; eval reports the task's rows
    validate(cfg)
    return cfg


def _model(settings: EvalSettings, run: FinishedRun | None, cfg: Any) -> Model:
    if settings.checkpoint is not None:
        return Model(settings.checkpoint, cfg.model_name, _checked_path("checkpoint", settings.checkpoint))
    if run is not None:
        return Model(f"run {run.name}", run.model, run.sampler_path)
    return Model(f"base model {cfg.model_name}", cfg.model_name)


def _against(settings: EvalSettings, model: Model, run: FinishedRun | None) -> Model | None:
    spec = settings.against
    if spec is None:
        return None
    if spec == BASE:
        return Model(f"base model {model.base_model}", model.base_model)
    if spec.startswith("tinker://"):
        return Model(spec, model.base_model, _checked_path("against", spec))
    other = find_run(settings.results_dir, spec)
    if other.model != model.base_model:
        raise ConfigError(
            f"against={spec}: run {other.name} trained {other.model}, not {model.base_model}; a paired comparison "
            "needs two models of one base model (the same renderer and tokens)"
        )
    return Model(f"run {other.name}", other.model, other.sampler_path)


def _checked_path(key: str, path: str) -> str:
    if not re.fullmatch(r"tinker://[^/\s]+/sampler_weights/[^/\s]+", path):
        raise ConfigError(
            f"{key}={path}: not sampler weights; expected tinker://<run>/sampler_weights/<name> (a run's "
            "checkpoints.jsonl lists them as sampler_path)"
        )
    return path


def _out_dir(settings: EvalSettings, model: Model) -> Path:
    if settings.out is not None:
        return Path(settings.out)
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", model.label).strip("-")[:60]
    return Path(settings.results_dir) / "evals" / f"{slug}-{dt.datetime.now().strftime('%Y%m%d-%H%M%S')}"


async def _evaluate_models(train_config: Any, models: list[Model], out: Path) -> dict[str, Any]:
    """The recipe built as a run builds it, each model evaluated by the method, the rows and eval.json written."""
    preflight.load_env()
    where = backend.choose_backend(train_config)
    for note in preflight.check_credentials(where):
        say(f"preflight: {note}")
    recipe = await asyncio.to_thread(choose_recipe, train_config, where, False)
    store = results.ResultsDir(out)
    state = RunState(recipe.cfg, "eval", where, recipe.task, store)
    # out/logs/eval: the engine's log, the data as evaluated
    state.log_path.mkdir(parents=True, exist_ok=True)
    say(
        f"eval: {', '.join(m.label for m in models)} on task={recipe.task} (backend {where}); results in {out}"
    )
    scored: list[tuple[Model, list[dict[str, Any]], float]] = []
    with CONSOLE.capture(out / "console.log"):
        async with prepared(state, recipe.method) as ctx:
            for model in models:
                client = await _sampler(ctx.service, model)
                rows, score = await recipe.method.evaluate(client, model.label)
                rows = [as_dict(r) for r in rows]
                say(f"{model.label}: {recipe.method.score_text(score)}")
                scored.append((model, rows, score))
    record = eval_record(recipe, scored, where)
    for index, (_, rows, _) in enumerate(scored):
        store.write_jsonl(ROW_FILES[index], rows)
    store.write_json(EVAL_FILE, record)
    if "verdict" in record:
        say(f"verdict: {record['improvement']['verdict_text']}")
    say(f"eval: wrote {out / EVAL_FILE}")
    return record


ROW_FILES = ("model.jsonl", "against.jsonl")
EVAL_FILE = "eval.json"


async def _sampler(service: Any, model: Model) -> Any:
    """A sampling client of `model`; a checkpoint the service does not have is one line naming it."""
    if model.path is None:
        return await service.create_sampling_client(base_model=model.base_model)
    import tinker

    try:
        info = await service.create_rest_client().get_weights_info_by_tinker_path(model.path)
    except tinker.APIStatusError as exc:  # a 4xx: the service has no such checkpoint (or may not read it)
        raise UserError(
            f"{model.label}: no such checkpoint on this backend ({str(exc).splitlines()[0][:160]})"
        ) from None
    if info.base_model != model.base_model:
        raise UserError(f"{model.label}: trained from {info.base_model}; give model_name={info.base_model}")
    return await service.create_sampling_client(model_path=model.path)


def eval_record(recipe: Recipe, scored: list[tuple[Model, list[dict[str, Any]], float]], where: str) -> dict:
    """eval.json: what was evaluated on what, each model's score, and with two models the paired verdict."""
    method = recipe.method
    dataset, sizes, _ = method.describe()
    record: dict[str, Any] = {
        "method": recipe.task,
        "metric": method.metric,
        "score_label": method.score_label,
        "backend": where,
        "dataset": dict(dataset),
        "sizes": dict(sizes),
        "settings": {k: v for k, v in config_to_dict(recipe.cfg).items() if k not in TRAINING_ONLY},
        "models": [
            {"label": m.label, "base_model": m.base_model, "checkpoint": m.path, "score": score, "rows": file}
            for (m, _, score), file in zip(scored, ROW_FILES, strict=False)
        ],
        "created_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    }
    if len(scored) == 2:
        (_, model_rows, _), (_, against_rows, _) = scored
        comparison = results.compare_examples(against_rows, model_rows, method.metric)
        judged = judge_improvement(method.metric, comparison)
        record["verdict"] = judged["verdict"]
        record["improvement"] = {
            **{k: v for k, v in judged.items() if k != "text"},
            "verdict_text": judged["text"],
        }
        record["per_example"] = {
            k: comparison[k] for k in ("paired", "improved", "regressed", "unchanged", "errors")
        }
    return json_safe(record)
