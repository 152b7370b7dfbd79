"""The end of a run: the trained model's rows, the per-example comparison, W&B verified, summary.json, the report
and the closing lines on the terminal; or, when the run stopped part-way, a summary that says so."""

from __future__ import annotations

from typing import Any

from posttrain.pipeline import results, tracking
from posttrain.pipeline.console import CONSOLE
from posttrain.pipeline.settings import config_to_dict
from posttrain.pipeline.setup import plan
from posttrain.pipeline.state import RunState
from posttrain.util import read_jsonl, redact

say = CONSOLE.say
GUARD_FILES = ("guard_base_model.jsonl", "guard_trained_model.jsonl")


def settings_record(state: RunState) -> dict[str, Any]:
    """Every setting as used: the configuration plus what was chosen for it."""
    return {
        **config_to_dict(state.cfg),
        "learning_rate": state.chosen.learning_rate if state.chosen else None,
        "learning_rate_source": state.chosen.lr_source if state.chosen else "",
        **(
            {
                "num_epochs_source": state.length.num_epochs_source,
                "batch_size_source": state.length.batch_size_source,
            }
            if state.length
            else {}
        ),
        "wandb_project": tracking.resolve_project(state.cfg.wandb_project),
    }


def write_results(state: RunState, outcome: results.Outcome) -> dict[str, Any]:
    cfg, res = state.cfg, state.store
    write_rows(res, outcome)
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
    facts = run_facts(state, verification)
    summary = results.build_summary(facts, outcome, verification, comparison)
    summary["tokens"] = token_record(state)
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
    results.write_report_html(res, summary)

    say("")
    for line in (
        summary["headline"],
        f"verdict: {summary['improvement']['verdict_text']}",
        f"guard: {summary['guard']['text']}",
    ):
        say(line)
    say(
        f"per example: {comparison['improved']} improved, {comparison['regressed']} regressed, "
        f"{comparison['unchanged']} unchanged"
    )
    verified = "verified" if verification["verified"] else "NOT verified"
    say(f"W&B ({verification['mode']}): {verified}: {facts.wandb_url}")
    guard_files = ", guard_*.jsonl" if outcome.guard is not None else ""
    say(
        f"results: {res.path}/ (summary.json, base_model.jsonl, trained_model.jsonl{guard_files}, "
        "report.md, report.html)"
    )
    if warning:
        say("")
        say(warning)
    return summary


def run_facts(state: RunState, verification: dict[str, Any]) -> results.RunFacts:
    """What summary.json says of the run itself: names, where it ran, its settings, durations, checkpoint."""
    cfg = state.cfg
    return results.RunFacts(
        method=state.method,
        run_name=state.run_name,
        tinker_run_id=state.checkpoint.tinker_run_id if state.checkpoint else "",
        log_path=str(state.log_path),
        wandb_url=verification.get("url_or_path") or "",
        model=cfg.model_name,
        backend=f"local ({cfg.base_url})" if state.backend == "local" and cfg.base_url else state.backend,
        renderer=state.chosen.renderer if state.chosen else "",
        renderer_source=state.chosen.renderer_source if state.chosen else "",
        hyperparameters=settings_record(state),
        durations=state.durations,
        checkpoint_path=state.checkpoint.sampler_path if state.checkpoint else None,
    )


def write_rows(res: results.ResultsDir, outcome: results.Outcome) -> None:
    """The trained model's rows and, with a guard set, both models' guard rows (in SFT's schema)."""
    # base_model.jsonl was written when the base evaluation finished (a resumed run keeps it).
    res.write_jsonl(results.TRAINED_FILE, outcome.trained_rows)
    if outcome.guard is not None:
        res.write_jsonl(GUARD_FILES[0], outcome.guard[2])
        res.write_jsonl(GUARD_FILES[1], outcome.guard[3])


def token_record(state: RunState) -> dict[str, Any]:
    """The token estimate made before training, beside the tokens the training loop reports it trained on."""
    files = [s.log_path / "metrics.jsonl" for s in state.stages] or [state.log_path / "metrics.jsonl"]
    rows = [r for f in files if f.is_file() for r in read_jsonl(f)]
    trained = sum(r["num_tokens"] for r in rows if isinstance(r.get("num_tokens"), int | float))
    return {"estimate": state.budget.as_dict() if state.budget else None, "trained_reported": trained or None}


def write_partial(state: RunState, exc: BaseException) -> None:
    state.store.write_json(
        results.SUMMARY_FILE,
        {
            "method": state.method,
            "run_name": state.run_name,
            "status": "failed",
            "error": redact(f"{type(exc).__name__}: {exc}")[:2000],
            "tinker_run_id": state.checkpoint.tinker_run_id if state.checkpoint else None,
            "log_path": str(state.log_path),
            "backend": state.backend,
            "baseline": state.baseline,
            "trained": state.trained,
            "durations_seconds": state.durations,
            "hyperparameters": settings_record(state),
        },
    )
