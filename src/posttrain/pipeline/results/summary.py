"""summary.json: the comparison of base and trained rows, the improvement, the headline and the checks.

`build_summary(facts, outcome, wandb_verification, comparison)` assembles the document the user's guide asks
for (`task_type`, `tinker_run_id`, `log_path`, `wandb_url`, `baseline_*`/`trained_*`) plus every setting,
sizes, durations and versions; `validate_summary` checks those fields before anything is written.
"""

from __future__ import annotations

import datetime as _dt
import math
import platform
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from posttrain.pipeline.results.guard import guard_summary
from posttrain.pipeline.results.rows import (
    MetricKind,
    as_dict,
    is_number,
    mean_metric,
    metric_value,
    summary_kind,
)
from posttrain.pipeline.results.store import SUMMARY_FILE, ResultsDir
from posttrain.pipeline.results.verdict import VERDICTS, paired_verdict, verdict_text

# Per-example NLL counts as changed when it moves by more than this fraction of the base NLL.
NLL_RELATIVE_TOLERANCE = 1e-3
# Distillation with several teachers: summary.json `teachers`, one object per teacher in teacher_model order,
# each measured on its own held-out prompts (on-policy adds baseline_reverse_kl, trained_reverse_kl,
# prompts_per_step and training_metric). A null NLL or KL: none of that teacher's examples could be scored.
TEACHER_KEYS = (
    "teacher_model",
    "dataset",
    "train_prompts",
    "eval_prompts",
    "teacher_train_traces",
    "teacher_eval_traces",
    "baseline_nll",
    "trained_nll",
)


def collect_versions() -> dict[str, str | None]:
    """Versions of posttrain, tinker, tinker_cookbook, torch and python (without importing torch)."""
    from posttrain import __version__

    def v(dist: str) -> str | None:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            return None

    return {
        "posttrain": __version__,
        "tinker": v("tinker"),
        "tinker_cookbook": v("tinker-cookbook"),
        "torch": v("torch"),
        "wandb": v("wandb"),
        "python": platform.python_version(),
    }


# The user guide's two task types: accuracy-based evaluation ("rl": RL, rubrics, preference accuracy) and
# loss-based evaluation ("sft": SFT, distillation); `method` says which training method ran.
TASK_TYPES: dict[MetricKind, str] = {"score": "rl", "nll": "sft"}


@dataclass(frozen=True)
class RunFacts:
    """What the run was: everything summary.json holds that is not a measurement."""

    method: str  # the training method (task=): sft, rl, dpo, ...
    run_name: str
    tinker_run_id: str
    log_path: str
    wandb_url: str
    model: str
    backend: str
    renderer: str
    renderer_source: str
    hyperparameters: Mapping[str, Any]
    durations: Mapping[str, float]
    checkpoint_path: str | None = None


@dataclass(frozen=True)
class Outcome:
    """What a training method measured: the same evaluation on the base and the trained model.

    `baseline`/`trained` are accuracies in [0, 1] (kind "score") or mean NLLs (kind "nll"); the rows follow the
    schema of their kind (see `rows`). `dataset` and `sizes` say what was trained and evaluated on; `extra`
    holds method-specific facts for summary.json.
    """

    kind: MetricKind
    base_rows: list[dict[str, Any]]
    trained_rows: list[dict[str, Any]]
    baseline: float
    trained: float
    dataset: Mapping[str, Any]
    sizes: Mapping[str, int]
    extra: Mapping[str, Any] = field(default_factory=dict)
    # What the score measures, for the headline and report ("accuracy", "preference accuracy", ...).
    score_label: str = "accuracy"
    # The guard set's NLL rows: (name, source, base rows, trained rows); None with guard=false.
    guard: tuple[str, str, list[Any], list[Any]] | None = None


def compute_improvement(kind: MetricKind, baseline: float, trained: float) -> dict[str, Any]:
    """How much better the trained model is: positive `absolute` = better, whatever the metric direction.

    NLL: absolute = baseline - trained (the reduction), relative = absolute / baseline.
    Score: absolute = trained - baseline, points = 100 * absolute, relative = absolute / baseline (None if 0).
    Whether that is more than noise is the verdict's (`judge_improvement`).
    """
    if kind == "nll":
        absolute = baseline - trained
        relative = absolute / baseline if baseline > 0 else None
        pct = abs(relative) * 100 if relative is not None else None
        text = f"{pct:.1f}% {'reduction' if absolute >= 0 else 'increase'}" if pct is not None else "n/a"
        return {
            "metric": "nll",
            "higher_is_better": False,
            "absolute": absolute,
            "relative": relative,
            "description": text,
        }
    absolute = trained - baseline
    relative = absolute / baseline if baseline > 0 else None
    return {
        "metric": "accuracy",
        "higher_is_better": True,
        "absolute": absolute,
        "points": absolute * 100,
        "relative": relative,
        "description": f"{absolute * 100:+.1f} points",
    }


def judge_improvement(kind: MetricKind, comparison: Mapping[str, Any]) -> dict[str, Any]:
    """The verdict on the paired held-out examples: the mean per-example difference (NLL: per-example NLL, in
    nats; scores: in points), its 95% interval, the test, its p-value, and `text` for the terminal and reports."""
    v = paired_verdict(comparison.get("deltas", []), binary=not comparison.get("graded", kind == "nll"))
    unit, scale = ("nats per example", 1.0) if kind == "nll" else ("points", 100.0)
    return {**v, "unit": unit, "scale": scale, "text": verdict_text(v, unit, scale)}


def headline(summary: Mapping[str, Any]) -> str:
    """'Base NLL: 2.80 → Trained NLL: 1.90 (32.1% reduction)' or
    'Base accuracy: 42.0% → Trained: 67.0% (+25.0 points)'."""
    if summary_kind(summary) == "score":
        b, t = summary["baseline_score"], summary["trained_score"]
        label = summary.get("score_label") or "accuracy"
        return f"Base {label}: {b * 100:.1f}% → Trained: {t * 100:.1f}% ({(t - b) * 100:+.1f} points)"
    b, t = summary["baseline_nll"], summary["trained_nll"]
    imp = compute_improvement("nll", b, t)
    return f"Base NLL: {b:.2f} → Trained NLL: {t:.2f} ({imp['description']})"


def build_summary(
    facts: RunFacts,
    outcome: Outcome,
    wandb_verification: Mapping[str, Any] | None,
    comparison: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The summary.json content: the user guide's fields first, then everything needed to reproduce the run.

    `wandb_url` is the run URL online; offline it is the local offline-run directory (`wandb sync` it).
    """
    improvement = compute_improvement(outcome.kind, outcome.baseline, outcome.trained)
    if comparison is None:
        comparison = compare_examples(outcome.base_rows, outcome.trained_rows, outcome.kind)
    judged = judge_improvement(outcome.kind, comparison)
    improvement.update(
        {k: judged[k] for k in ("difference", "unit", "interval", "confidence", "test", "p_value", "n")}
    )
    improvement.update(examples_needed=judged["examples_needed"], verdict_text=judged["text"])
    summary: dict[str, Any] = {
        "task_type": TASK_TYPES[outcome.kind],
        "method": facts.method,
        "run_name": facts.run_name,
        "tinker_run_id": facts.tinker_run_id,
        "log_path": str(facts.log_path),
        "wandb_url": facts.wandb_url,
    }
    if outcome.kind == "score":
        summary.update(
            baseline_score=outcome.baseline, trained_score=outcome.trained, score_label=outcome.score_label
        )
    else:
        summary.update(baseline_nll=outcome.baseline, trained_nll=outcome.trained)
    summary.update(
        headline="",
        improvement=improvement,
        verdict=judged["verdict"],
        model=facts.model,
        backend=facts.backend,
        renderer={"name": facts.renderer, "source": facts.renderer_source},
        dataset=dict(outcome.dataset),
        sizes=dict(outcome.sizes),
        hyperparameters=dict(facts.hyperparameters),
        durations_seconds=dict(facts.durations),
        versions=collect_versions(),
        wandb_verification=dict(wandb_verification) if wandb_verification is not None else None,
        checkpoint_path=facts.checkpoint_path,
        created_at=_dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
    )
    summary["headline"] = headline(summary)
    summary["per_example"] = {
        k: comparison[k]
        for k in ("paired", "improved", "regressed", "unchanged", "errors")
        if k in comparison
    }
    summary["guard"] = guard_summary(outcome.guard, outcome.base_rows, outcome.trained_rows)
    for side, rows in (("baseline", outcome.base_rows), ("trained", outcome.trained_rows)):
        summary.update(game_outcome_rates(rows, side))
    summary.update({"status": "completed", **outcome.extra})
    return summary


def game_outcome_rates(rows: Iterable[Any], side: str) -> dict[str, float]:
    """Games (rows whose `details` carry an `outcome`): `{side}_win_rate`, `_draw_rate`, `_loss_rate` and, where
    the game has illegal moves, `_illegal_move_rate`, over the games played without error; {} for other rows."""
    played = [
        d["details"]
        for d in map(as_dict, rows)
        if d.get("error") is None and isinstance(d.get("details"), Mapping) and "outcome" in d["details"]
    ]
    if not played:
        return {}
    rates = {
        f"{side}_{k}_rate": sum(g["outcome"] == k for g in played) / len(played)
        for k in ("win", "draw", "loss")
    }
    if any("illegal_move" in g for g in played):
        rates[f"{side}_illegal_move_rate"] = sum(bool(g.get("illegal_move")) for g in played) / len(played)
    return rates


def validate_summary(d: Mapping[str, Any]) -> None:
    """Raise ValueError listing every problem unless `d` has the spec's fields with the right types."""
    problems: list[str] = []
    if not isinstance(d, Mapping):
        raise ValueError("summary must be a JSON object")
    if d.get("task_type") not in TASK_TYPES.values():
        problems.append(
            f"task_type must be one of {', '.join(TASK_TYPES.values())} (got {d.get('task_type')!r})"
        )
    if not isinstance(d.get("method"), str) or not d.get("method"):
        problems.append(f"method must name the training method (got {d.get('method')!r})")
    for key in ("tinker_run_id", "log_path", "model", "backend"):
        if not isinstance(d.get(key), str) or not d.get(key, "").strip():
            problems.append(f"{key} must be a non-empty string (got {d.get(key)!r})")
    # wandb_url: the run URL (online) or the offline run directory; empty only when the W&B check failed and
    # wandb_verification says why.
    url, wv = d.get("wandb_url"), d.get("wandb_verification")
    failed_check = isinstance(wv, Mapping) and wv.get("verified") is False and bool(wv.get("detail"))
    if not isinstance(url, str) or (not url.strip() and not failed_check):
        problems.append(f"wandb_url must be a non-empty string (got {url!r})")
    pairs = {"score": ("baseline_score", "trained_score"), "nll": ("baseline_nll", "trained_nll")}
    if ("baseline_score" in d) == ("baseline_nll" in d):
        problems.append("exactly one of baseline_score (accuracy) and baseline_nll must be present")
    for kind in [summary_kind(d)]:
        for key in pairs[kind]:
            v = d.get(key)
            if not is_number(v):
                problems.append(f"{key} must be a finite number (got {v!r})")
            elif kind == "score" and not 0 <= v <= 1:
                problems.append(f"{key} must be an accuracy in [0, 1] (got {v!r})")
            elif kind == "nll" and v < 0:
                problems.append(f"{key} must be >= 0 (got {v!r})")
    if d.get("verdict") not in VERDICTS:
        problems.append(f"verdict must be one of {', '.join(VERDICTS)} (got {d.get('verdict')!r})")
    imp = d.get("improvement")
    if not isinstance(imp, Mapping) or not is_number(imp.get("absolute")):
        problems.append("improvement must be an object with a numeric 'absolute'")
    if not isinstance(d.get("hyperparameters"), Mapping):
        problems.append("hyperparameters must be an object (every setting)")
    if not isinstance(d.get("versions"), Mapping):
        problems.append("versions must be an object")
    wv = d.get("wandb_verification")
    if wv is not None and (not isinstance(wv, Mapping) or not isinstance(wv.get("verified"), bool)):
        problems.append("wandb_verification must be null or an object with a boolean 'verified'")
    if "teachers" in d:
        problems.extend(_teacher_problems(d["teachers"]))
    if problems:
        raise ValueError("invalid summary: " + "; ".join(problems))


def _teacher_problems(teachers: Any) -> list[str]:
    if not isinstance(teachers, list) or len(teachers) < 2:
        return ["teachers must be a list of at least 2 objects (one per teacher)"]
    problems = []
    for k, t in enumerate(teachers):
        if not isinstance(t, Mapping) or any(key not in t for key in TEACHER_KEYS):
            problems.append(f"teachers[{k}] must be an object with {', '.join(TEACHER_KEYS)}")
            continue
        if not isinstance(t["teacher_model"], str) or not t["teacher_model"]:
            problems.append(f"teachers[{k}].teacher_model must be a non-empty string")
        for key in ("train_prompts", "eval_prompts", "teacher_train_traces", "teacher_eval_traces"):
            if not isinstance(t[key], int) or isinstance(t[key], bool) or t[key] < 0:
                problems.append(f"teachers[{k}].{key} must be an integer >= 0 (got {t[key]!r})")
        for key in ("baseline_nll", "trained_nll", "baseline_reverse_kl", "trained_reverse_kl"):
            v = t.get(key)
            if v is not None and not (is_number(v) and (v >= 0 or "reverse_kl" in key)):
                problems.append(
                    f"teachers[{k}].{key} must be a finite number (>= 0 for NLL) or null (got {v!r})"
                )
    return problems


def write_summary(results: ResultsDir, summary: Mapping[str, Any]) -> Path:
    """Validate and write summary.json."""
    validate_summary(summary)
    return results.write_json(SUMMARY_FILE, summary)


# ------------------------------------------------------------------------------------------ comparison


def _snippet(text: Any, n: int = 120) -> str:
    s = " ".join(str(text or "").split())
    return s if len(s) <= n else s[: n - 1] + "…"


# A partial-credit score (reward in [0, 1]) that moved by less than this counts as unchanged.
REWARD_TOLERANCE = 0.01


def _partial(row: dict) -> bool:
    reward = row.get("reward")
    return isinstance(reward, int | float) and not isinstance(reward, bool) and math.isfinite(reward)


def compare_examples(
    base_rows: Iterable[Any], trained_rows: Iterable[Any], kind: MetricKind, top: int = 5
) -> dict:
    """Pair base and trained rows by `index` and count improved / regressed / unchanged examples.

    SFT: improved when the trained NLL is lower by more than NLL_RELATIVE_TOLERANCE of the base NLL (regressed:
    higher by more than that). RL: improved when correct flipped false→true, regressed true→false; where both
    rows carry a partial-credit `reward` (code's fraction of tests, a rubric's judged score, a user verifier's
    value), when it rose (fell) by more than REWARD_TOLERANCE. Rows with an
    error (or a null metric) on either side are counted in `errors`, not in the three buckets. `base_mean` /
    `trained_mean` average only the examples both models were evaluated on without error: use them as the
    summary's baseline/trained numbers so both sides cover the same examples.
    """
    base = {d["index"]: d for d in map(as_dict, base_rows)}
    trained = {d["index"]: d for d in map(as_dict, trained_rows)}
    paired_idx = sorted(set(base) & set(trained))
    improved, regressed, unchanged, errors = [], [], [], []
    deltas: list[float] = []
    graded = kind == "nll"
    for i in paired_idx:
        bv, tv = metric_value(base[i], kind), metric_value(trained[i], kind)
        if bv is None or tv is None:
            errors.append(i)
            continue
        entry, tol = paired_entry(i, base[i], trained[i], kind)
        delta = entry["delta"]
        deltas.append(delta)
        graded = graded or "base_reward" in entry
        (improved if delta > tol else regressed if delta < -tol else unchanged).append(entry)
    valid = [i for i in paired_idx if i not in set(errors)]
    improved.sort(key=lambda e: -e["delta"])
    regressed.sort(key=lambda e: e["delta"])
    return {
        "kind": kind,
        "paired": len(paired_idx),
        "improved": len(improved),
        "regressed": len(regressed),
        "unchanged": len(unchanged),
        "errors": len(errors),
        "error_indices": errors,
        # Means over the examples evaluated successfully on both sides (a like-for-like comparison).
        "base_mean": mean_metric([base[i] for i in valid], kind),
        "trained_mean": mean_metric([trained[i] for i in valid], kind),
        "unpaired_base": sorted(set(base) - set(trained)),
        "unpaired_trained": sorted(set(trained) - set(base)),
        "top_improved": improved[:top],
        "top_regressed": regressed[:top],
        # Each paired example's difference (positive: better), for the verdict's interval and test.
        "deltas": deltas,
        "graded": graded,
    }


def paired_entry(i: int, b: dict, t: dict, kind: MetricKind) -> tuple[dict[str, Any], float]:
    """One example's report entry (`delta` > 0: better) and the tolerance its delta must exceed to count."""
    bv, tv = metric_value(b, kind), metric_value(t, kind)
    assert bv is not None and tv is not None
    if kind == "nll":
        entry = {"index": i, "prompt": _snippet(b.get("prompt")), "base": bv, "trained": tv, "delta": bv - tv}
        return entry, NLL_RELATIVE_TOLERANCE * max(abs(bv), 1e-8)
    common = {"base": bool(bv), "trained": bool(tv), "delta": tv - bv}
    if "margin" in b:  # preference rows: the margin moves even when `correct` does not flip
        margins = {"base_margin": b.get("margin"), "trained_margin": t.get("margin")}
        return {"index": i, "prompt": _snippet(b.get("prompt")), **margins, **common}, 0.0
    entry = {
        "index": i,
        "question": _snippet(b.get("question")),
        "ground_truth": _snippet(b.get("ground_truth"), 60),
        "base_answer": _snippet(b.get("extracted_answer"), 60),
        "trained_answer": _snippet(t.get("extracted_answer"), 60),
        **common,
    }
    if _partial(b) and _partial(t):  # partial credit (tests passed, judged items): it moves first
        entry.update(base_reward=b["reward"], trained_reward=t["reward"], delta=t["reward"] - b["reward"])
        return entry, REWARD_TOLERANCE
    return entry, 0.0
