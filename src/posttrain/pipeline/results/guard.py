"""summary.json's `guard`: what training did to what it was not trained on, judged like the task's verdict.

Checks, each a paired comparison of base and trained model on the same examples:
- the guard set's NLL (general chat by default; `evaluation/guard.py`), for every method;
- preference methods whose pairs carry an answer: the task score of each model's own greedy answer to the held-out
  prompts (preference accuracy scores the given pairs, not what the model now writes);
- every method whose rows hold the model's answers (RL, preference): their length, reported beside the checks.

A check REGRESSED when its 95% interval lies entirely on the worse side and the point estimate is worse by more
than a material margin (NLL: 5% of the base model's; a score: 5 points). The margin keeps a tiny but certain
drift in general-chat NLL, which nearly every fine-tune has, from crying wolf; the interval keeps noise out.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from posttrain.pipeline.results.rows import as_dict
from posttrain.pipeline.results.verdict import paired_verdict, verdict_text

NLL_MARGIN = 0.05  # of the base model's mean NLL on the guard set
SCORE_MARGIN = 0.05  # of accuracy (5 points)


def guard_summary(
    general: tuple[str, str, Sequence[Any], Sequence[Any]] | None,
    base_rows: Sequence[Any],
    trained_rows: Sequence[Any],
) -> dict[str, Any]:
    """The guard block: `checks`, the names of those that `regressed`, and `text` for the verdict line.

    `general`: (name, source, base rows, trained rows) of the guard set's NLL, None with guard=false.
    """
    checks: list[dict[str, Any]] = []
    if general is not None:
        name, source, base_guard, trained_guard = general
        checks.append(_nll_check(name, source, base_guard, trained_guard))
    if task := _task_answers_check(base_rows, trained_rows):
        checks.append(task)
    regressed = [c["name"] for c in checks if c["regressed"]]
    length = answer_lengths(base_rows, trained_rows)
    return {
        "checks": checks,
        "regressed": regressed,
        **({"answer_chars": length} if length else {}),
        "text": guard_text(checks, length),
    }


def _nll_check(name: str, source: str, base: Sequence[Any], trained: Sequence[Any]) -> dict[str, Any]:
    pairs = _paired(base, trained, lambda d: d.get("nll"))
    deltas = [b - t for b, t in pairs]  # positive: the trained model's NLL is lower (better)
    v = paired_verdict(deltas, binary=False)
    base_mean = sum(b for b, _ in pairs) / len(pairs) if pairs else 0.0
    trained_mean = sum(t for _, t in pairs) / len(pairs) if pairs else 0.0
    worse = v["interval"][1] < 0 and -v["difference"] > NLL_MARGIN * base_mean
    return _check(name, source, "nll", v, (base_mean, trained_mean), worse)


def _task_answers_check(base_rows: Sequence[Any], trained_rows: Sequence[Any]) -> dict[str, Any] | None:
    pairs = _paired(base_rows, trained_rows, lambda d: d.get("task_correct"))
    if not pairs:
        return None
    v = paired_verdict([float(t) - float(b) for b, t in pairs], binary=True)
    base_mean = sum(map(float, (b for b, _ in pairs))) / len(pairs)
    trained_mean = sum(map(float, (t for _, t in pairs))) / len(pairs)
    worse = v["interval"][1] < 0 and -v["difference"] > SCORE_MARGIN
    source = "each model's greedy answer to the held-out prompts, graded against the pair's answer"
    return _check("task accuracy of greedy answers", source, "score", v, (base_mean, trained_mean), worse)


# A check's unit and the factor that turns its differences into it, by metric.
UNITS = {"nll": ("nats per example", 1.0), "score": ("points", 100.0)}


def _check(
    name: str, source: str, metric: str, v: dict, means: tuple[float, float], worse: bool
) -> dict[str, Any]:
    (base, trained), (unit, scale) = means, UNITS[metric]
    return {
        "name": name,
        "source": source,
        "metric": metric,
        "baseline": base,
        "trained": trained,
        "difference": v["difference"],
        "unit": unit,
        "interval": v["interval"],
        "test": v["test"],
        "p_value": v["p_value"],
        "n": v["n"],
        "regressed": worse,
        # the numbers; "regressed" is this check's word
        "text": f"{_mean(base, metric)} -> {_mean(trained, metric)}, "
        + verdict_text(v, unit, scale).rsplit(": ", 1)[0],
    }


def _mean(value: float, metric: str) -> str:
    """A model's mean as the text shows it: an NLL in nats, a score in percent."""
    return f"{value:.3f}" if metric == "nll" else f"{value * 100:.1f}%"


def _paired(base: Sequence[Any], trained: Sequence[Any], value: Any) -> list[tuple[Any, Any]]:
    """(base, trained) values of the examples both sides scored (no error, a value on each side)."""
    b = {d["index"]: d for d in map(as_dict, base) if d.get("error") is None}
    t = {d["index"]: d for d in map(as_dict, trained) if d.get("error") is None}
    pairs = [(value(b[i]), value(t[i])) for i in sorted(set(b) & set(t))]
    return [(x, y) for x, y in pairs if isinstance(x, int | float) and isinstance(y, int | float)]


def answer_lengths(base: Sequence[Any], trained: Sequence[Any]) -> dict[str, float] | None:
    """Mean characters of each model's answers (rows that hold the model's own `completion`: RL, preference)."""
    pairs = _paired(
        base, trained, lambda d: len(d["completion"]) if isinstance(d.get("completion"), str) else None
    )
    if not pairs or not any(b or t for b, t in pairs) or not _model_written(base):
        return None
    b, t = sum(x for x, _ in pairs) / len(pairs), sum(y for _, y in pairs) / len(pairs)
    return {"baseline": b, "trained": t, "ratio": t / b if b else None}


def _model_written(rows: Sequence[Any]) -> bool:
    """SFT rows' `completion` is the reference answer, the same for both models: no length to compare."""
    first = as_dict(rows[0]) if rows else {}
    return "nll" not in first


def guard_text(checks: Sequence[Mapping[str, Any]], length: Mapping[str, Any] | None) -> str:
    """'no regression on the guard (general chat NLL 1.523 -> 1.511, +0.012 nats ...)' or 'REGRESSED on ...'."""
    if not checks and not length:
        return "no guard evaluation (guard=false)"
    regressed = [c for c in checks if c["regressed"]]
    shown = regressed or checks
    details = "; ".join(f"{c['name']} {c['text']}" for c in shown)
    head = (
        "REGRESSED on " + ", ".join(c["name"] for c in regressed)
        if regressed
        else "no regression on the guard"
    )
    text = f"{head} ({details})" if details else head
    if length and length.get("ratio") is not None:
        text += f"; answers {length['baseline']:.0f} -> {length['trained']:.0f} characters on average"
    return text
