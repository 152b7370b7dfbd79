"""A finished run, found by name in a results folder, and the service that holds its weights.

A run's results are `results_dir/summary.json` (the latest run) or `results_dir/previous/NAME/summary.json` (an
earlier one); its checkpoints are listed in the cookbook's `checkpoints.jsonl` under its log folder.
"""

from __future__ import annotations

import json
import os
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from posttrain.config.run import RunSettings
from posttrain.errors import PreflightError, UserError
from posttrain.pipeline.setup import backend, preflight
from posttrain.util import read_jsonl


@dataclass(frozen=True)
class FinishedRun:
    name: str
    summary: dict[str, Any]
    log_path: Path

    @property
    def model(self) -> str:
        return str(self.summary["model"])

    @property
    def backend(self) -> preflight.Backend:
        return "tinker" if self.summary.get("backend") == "tinker" else "local"

    @property
    def settings(self) -> dict[str, Any]:
        return dict(self.summary.get("hyperparameters") or {})

    @property
    def sampler_path(self) -> str:
        return str(self.summary["checkpoint_path"])

    def state_path(self) -> str:
        """The training checkpoint saved with the final sampler weights (what a download exports)."""
        for record_file in sorted(self.log_path.rglob("checkpoints.jsonl")):
            for record in read_jsonl(record_file):
                if record.get("sampler_path") == self.sampler_path and record.get("state_path"):
                    return str(record["state_path"])
        raise UserError(
            f"run {self.name}: no training checkpoint beside its final weights {self.sampler_path} in "
            f"{self.log_path}/checkpoints.jsonl"
        )


def find_run(results_dir: str, run_name: str | None) -> FinishedRun:
    """The run `run_name` (None: the latest) of `results_dir`, which must have finished with a trained model."""
    root = Path(results_dir)
    candidates = [root / "summary.json", *sorted(root.glob("previous/*/summary.json"))]
    summaries = {p: _read_summary(p) for p in candidates if p.is_file()}
    if not summaries:
        raise UserError(f"results_dir={results_dir}: no run there (no summary.json)")
    named = {str(s.get("run_name")): (p, s) for p, s in reversed(summaries.items())}
    if run_name is None:
        path, summary = next(iter(summaries.items()))
    elif run_name in named:
        path, summary = named[run_name]
    else:
        raise UserError(f"run_name={run_name}: no such run in {results_dir} (runs there: {', '.join(named)})")
    name = str(summary.get("run_name"))
    if summary.get("status") != "completed" or not summary.get("checkpoint_path"):
        why = summary.get("error") or summary.get("status") or "it has no trained model"
        raise UserError(
            f"run {name} ({path}) did not finish training, so it has no trained model: {str(why)[:200]}"
        )
    log_path = Path(str(summary.get("log_path") or ""))
    if not log_path.is_dir():
        log_path = root / "logs" / name
    return FinishedRun(name, summary, log_path)


def renderer_for(run: FinishedRun) -> Any:
    """The renderer the run trained with, on its model's tokenizer: prompts are rendered as in training."""
    from tinker_cookbook import renderers
    from tinker_cookbook.tokenizer_utils import get_tokenizer

    return renderers.get_renderer(str(run.summary["renderer"]["name"]), tokenizer=get_tokenizer(run.model))


async def sampler_for(service: Any, run: FinishedRun, base: bool = False) -> Any:
    """A sampling client of the run's final weights (`base`: of the model it started from)."""
    if base:
        return await service.create_sampling_client(base_model=run.model)
    return await service.create_sampling_client(model_path=run.sampler_path)


def answer_text(renderer: Any, tokens: list[int]) -> str:
    """The text of a sampled answer, parsed as the renderer parses its model's replies (thinking left out)."""
    from tinker_cookbook import renderers

    message, _ = renderer.parse_response(tokens)
    return renderers.get_text_content(message)


def _read_summary(path: Path) -> dict[str, Any]:
    try:
        summary = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise UserError(f"{path}: not a readable summary ({str(exc)[:120]})") from None
    if not isinstance(summary, dict):
        raise UserError(f"{path}: not a readable summary (not a JSON object)")
    return summary


@asynccontextmanager
async def service_for(
    run: FinishedRun, log_path: Path, say: Callable[[str], None]
) -> AsyncIterator[str | None]:
    """The service URL where the run's checkpoints live: Tinker, the engine it used, or a local engine started
    for this command (on the same checkpoint folder the run's engine wrote to)."""
    preflight.load_env()
    settings = run.settings
    cfg = RunSettings(
        model_name=run.model,
        backend=run.backend,
        base_url=settings.get("base_url"),
        dtype=settings.get("dtype") or "auto",
    )
    if run.backend == "tinker" and not os.environ.get("TINKER_API_KEY", "").strip():
        raise PreflightError(
            f"run {run.name} trained on the Tinker service: Missing required environment variables: TINKER_API_KEY "
            f"(set it in .env in {Path.cwd()})"
        )
    log_path.mkdir(parents=True, exist_ok=True)
    async with backend.service_url(cfg, run.backend, log_path, say) as url:
        yield url
