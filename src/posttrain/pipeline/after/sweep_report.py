"""A sweep's results: every run's validation score with its interval and verdict, each setting's mean and spread
over its seeds, the chosen setting and its one test number, as sweep.json, sweep.md and sweep.png."""

from __future__ import annotations

import json
import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from posttrain.pipeline.results.rows import json_safe, summary_kind
from posttrain.pipeline.results.verdict import interval_bounds

if TYPE_CHECKING:
    from posttrain.pipeline.after.sweep_grid import Grid

SELECTION = (
    "the setting with the best mean validation score over its seeds (NLL: lowest); its first seed's run is "
    "evaluated once on the test rows, which no run trained or was chosen on"
)


def collect(grid: Grid, cfg: Any) -> dict[str, Any]:
    """sweep.json's content, less the test result (added once the chosen run is evaluated)."""
    points = [_point(grid, p) for p in grid.points]
    settings = _settings(points)
    record: dict[str, Any] = {
        "folder": str(grid.folder),
        "axes": grid.axes,
        "shared": grid.shared,
        "model": cfg.model_name,
        "data": json.loads((grid.data / "split.json").read_text()),
        "points": points,
        "settings": settings,
        "selection": SELECTION,
    }
    scored = [s for s in settings if s["mean"] is not None]
    if scored:
        lower = scored[0]["metric"] == "nll"
        best = min(scored, key=lambda s: s["mean"]) if lower else max(scored, key=lambda s: s["mean"])
        record["chosen"] = {
            "setting": best["setting"],
            "validation_mean": best["mean"],
            "run": best["runs"][0],
        }
    return record


def _point(grid: Grid, point: Any) -> dict[str, Any]:
    entry: dict[str, Any] = {"id": point.id, "values": dict(point.values), "setting": dict(point.setting)}
    try:
        summary = json.loads((grid.results_dir(point) / "summary.json").read_text())
    except (OSError, ValueError):
        return {**entry, "status": "not run"}
    if summary.get("status") != "completed":
        return {
            **entry,
            "status": summary.get("status") or "failed",
            "error": str(summary.get("error") or "")[:200],
        }
    kind = summary_kind(summary)
    improvement = summary.get("improvement") or {}
    return {
        **entry,
        "status": "completed",
        "metric": kind,
        "baseline": summary["baseline_score" if kind == "score" else "baseline_nll"],
        "trained": summary["trained_score" if kind == "score" else "trained_nll"],
        "difference": improvement.get("difference"),
        "interval": improvement.get("interval"),
        "unit": improvement.get("unit"),
        "verdict": summary.get("verdict"),
        "seconds": (summary.get("durations_seconds") or {}).get("total"),
    }


def _settings(points: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Each setting's validation scores over its seeds: mean, lowest, highest."""
    groups: dict[str, list[Mapping[str, Any]]] = {}
    for p in points:
        groups.setdefault(json.dumps(p["setting"], sort_keys=True), []).append(p)
    out = []
    for members in groups.values():
        done = [p for p in members if p["status"] == "completed"]
        values = [p["trained"] for p in done]
        out.append(
            {
                "setting": members[0]["setting"],
                "runs": [p["id"] for p in done],
                "seeds": len(members),
                "completed": len(done),
                "metric": done[0]["metric"] if done else None,
                "mean": statistics.fmean(values) if values else None,
                "lowest": min(values, default=None),
                "highest": max(values, default=None),
            }
        )
    return out


def write(folder: Path, record: Mapping[str, Any]) -> None:
    (folder / "sweep.json").write_text(json.dumps(json_safe(record), indent=2) + "\n", encoding="utf-8")
    (folder / "sweep.md").write_text("\n".join(markdown(record)) + "\n", encoding="utf-8")
    plot(record, folder / "sweep.png")


def _value(metric: str | None, v: Any) -> str:
    if v is None:
        return "-"
    return f"{v * 100:.1f}%" if metric == "score" else f"{v:.3f}"


def _interval(p: Mapping[str, Any]) -> str:
    if p.get("difference") is None:
        return "-"
    scale, digits = (100.0, 1) if p.get("unit") == "points" else (1.0, 3)
    return f"{p['difference'] * scale:+.{digits}f} {interval_bounds(p) or '[too few rows]'}"


def _setting_text(setting: Mapping[str, Any]) -> str:
    return " ".join(f"{k}={v}" for k, v in setting.items()) or "(the shared settings)"


def markdown(record: Mapping[str, Any]) -> list[str]:
    axes = list(record["axes"])
    data = record["data"]
    lines = [
        f"# Sweep {Path(record['folder']).name}",
        "",
        f"{record['model']}; {data['train']} training, {data['validation']} validation and {data['test']} test rows "
        f"from {data['source']}. Shared settings: `{' '.join(record['shared']) or '(defaults)'}`.",
        "",
        "## Runs (validation rows)",
        "",
        "| " + " | ".join([*axes, "base", "trained", "difference [95% interval]", "verdict", "time"]) + " |",
        "|" + "---|" * (len(axes) + 5),
    ]
    for p in record["points"]:
        metric = p.get("metric")
        cells = [str(p["values"][a]) for a in axes]
        if p["status"] != "completed":
            cells += ["-", "-", "-", p["status"], "-"]
        else:
            seconds = f"{p['seconds']:.0f} s" if p.get("seconds") is not None else "-"
            cells += [
                _value(metric, p["baseline"]),
                _value(metric, p["trained"]),
                _interval(p),
                p["verdict"],
                seconds,
            ]
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        "## Settings (mean over seeds, lowest to highest)",
        "",
        "| setting | runs | mean | spread |",
        "|---|---|---|---|",
    ]
    for s in record["settings"]:
        spread = (
            f"{_value(s['metric'], s['lowest'])} to {_value(s['metric'], s['highest'])}"
            if s["mean"] is not None
            else "-"
        )
        lines.append(
            f"| {_setting_text(s['setting'])} | {s['completed']}/{s['seeds']} "
            f"| {_value(s['metric'], s['mean'])} | {spread} |"
        )
    lines += ["", *_chosen_lines(record)]
    return lines


def _chosen_lines(record: Mapping[str, Any]) -> list[str]:
    chosen = record.get("chosen")
    if chosen is None:
        return ["No run completed: nothing was chosen."]
    lines = [f"Chosen: {_setting_text(chosen['setting'])} (run {chosen['run']}), by {record['selection']}."]
    test = chosen.get("test")
    if test is not None:
        metric = test["metric"]
        lines.append(
            f"On the test rows: base {_value(metric, test['baseline'])} -> trained {_value(metric, test['trained'])}; "
            f"{test['improvement']['verdict_text']}"
        )
    return lines


def console_lines(record: Mapping[str, Any]) -> list[str]:
    lines = [
        f"sweep: {_setting_text(s['setting'])}: {_value(s['metric'], s['mean'])} on validation "
        f"({s['completed']}/{s['seeds']} runs"
        + (
            f", {_value(s['metric'], s['lowest'])} to {_value(s['metric'], s['highest'])})"
            if s["completed"] > 1
            else ")"
        )
        for s in record["settings"]
    ]
    lines += [f"sweep: {line}" for line in _chosen_lines(record)]
    lines.append(f"sweep: table {record['folder']}/sweep.md, plot sweep.png, everything sweep.json")
    return lines


def plot(record: Mapping[str, Any], path: Path) -> None:
    """Validation score against the first swept setting, a line per combination of the others, a dot per seed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    axes = [a for a in record["axes"] if a != "seed"] or ["seed"]
    x_axis, others = axes[0], axes[1:]
    done = [p for p in record["points"] if p["status"] == "completed"]
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    numeric = all(_number(p["values"][x_axis]) is not None for p in done)
    series: dict[str, list[tuple[Any, float]]] = {}
    for p in done:
        label = " ".join(f"{k}={p['values'][k]}" for k in others) or "runs"
        x = _number(p["values"][x_axis]) if numeric else p["values"][x_axis]
        series.setdefault(label, []).append((x, p["trained"]))
    for label, pts in series.items():
        ax.scatter([x for x, _ in pts], [y for _, y in pts], s=18, alpha=0.7)
        means: dict[Any, list[float]] = {}
        for x, y in pts:
            means.setdefault(x, []).append(y)
        xs = sorted(means, key=lambda v: v if numeric else str(v))
        ax.plot(xs, [statistics.fmean(means[x]) for x in xs], marker="o", label=label)
    if numeric and done and min(_number(p["values"][x_axis]) or 0 for p in done) > 0:
        ax.set_xscale("log")
    metric = done[0]["metric"] if done else "score"
    ax.set_xlabel(x_axis)
    ax.set_ylabel("validation accuracy" if metric == "score" else "validation NLL (lower is better)")
    if done:
        ax.axhline(
            statistics.fmean(p["baseline"] for p in done), color="grey", linestyle="--", label="base model"
        )
    ax.legend(fontsize=8)
    ax.set_title(f"sweep {Path(record['folder']).name}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _number(text: Any) -> float | None:
    try:
        return float(text)
    except (TypeError, ValueError):
        return None
