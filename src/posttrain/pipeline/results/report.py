"""report.md and training_curves.png: what a person reads after a run."""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from posttrain.pipeline.results.rows import is_number, summary_kind
from posttrain.pipeline.results.store import PLOT_FILE, REPORT_FILE, ResultsDir
from posttrain.pipeline.results.summary import compute_improvement, headline
from posttrain.util import atomic_output_path

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure


def _not_improved_warning(summary: Mapping[str, Any]) -> str:
    if summary.get("verdict") == "inconclusive":
        imp = summary.get("improvement") or {}
        needed = imp.get("examples_needed")
        # the verdict says it already
        said = "would tell an effect this size" in str(imp.get("verdict_text", ""))
        more = f" (about {needed} would tell an effect this size)" if needed and not said else ""
        return (
            f"NOTE: the trained model scored better, but not by more than noise on {imp.get('n', 0)} held-out "
            f"examples ({imp.get('verdict_text', headline(summary))}). Evaluate on more held-out examples"
            f"{more} (max_eval_rows, eval_dataset) before relying on it."
        )
    rl = summary_kind(summary) == "score"
    checks = [
        "learning rate: too low to move the model, or too high (loss/reward unstable) -- try learning_rate x3 or /3",
        "steps: too few optimizer steps (num_epochs, max_steps, batch_size) for the data",
    ]
    if rl:
        checks += [
            "reward signal: are rewards all 0 or all 1? (env/all/reward/total in metrics.jsonl); "
            "does the answer extraction match the completions?",
            "constant-reward groups: by_group/frac_mixed near 0 means every group got the same reward, so "
            "the advantages are zero and nothing is learned (raise group_size, adjust difficulty or max_tokens)",
        ]
    else:
        checks += [
            "training signal: train_mean_nll in metrics.jsonl should fall; train_on_what should cover the completions",
        ]
    checks.append(
        "data quality: are the targets consistent and correctly formatted? Is the eval set the same task?"
    )
    return (
        f"WARNING: the trained model did NOT improve on the base model ({headline(summary)}). "
        "Something is wrong -- check:\n" + "\n".join(f"- {c}" for c in checks)
    )


def _md(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def fmt_value(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def load_metrics(metrics_path: str | Path | None) -> list[dict[str, Any]]:
    """The cookbook's metrics.jsonl rows (`{"step": n, metric: value, ...}`); [] if missing/unreadable."""
    if metrics_path is None or not Path(metrics_path).is_file():
        return []
    rows = []
    for line in Path(metrics_path).read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


_TRAIN_KEYS = ("train_mean_nll", "env/all/reward/total", "loss", "dpo_loss", "train/loss")
_EVAL_SUFFIXES = ("nll", "reward/total", "accuracy", "correct", "loss")


def _series(rows: list[dict[str, Any]]) -> tuple[dict[str, list[tuple[float, float]]], dict[str, list]]:
    def collect(key: str) -> list[tuple[float, float]]:
        pts = []
        for n, row in enumerate(rows):
            v = row.get(key)
            if is_number(v):
                x = row.get("step", n)
                pts.append((float(x) if is_number(x) else float(n), float(v)))
        return pts

    keys = {k for row in rows for k in row}
    train = {k: collect(k) for k in _TRAIN_KEYS if k in keys}
    if not train:  # any loss-like training series
        train = {k: collect(k) for k in sorted(keys) if k.endswith(("loss", "nll")) and "/" not in k}
    evals = {
        k: collect(k)
        for k in sorted(keys)
        if k.startswith(("test/", "eval/", "evaluator/"))
        and k.endswith(_EVAL_SUFFIXES)
        and "/by_group/" not in k
    }
    train = {k: v for k, v in list(train.items())[:3] if v}
    evals = {k: v for k, v in list(evals.items())[:4] if v}
    return train, evals


def plot_training_curves(
    path: str | Path, summary: Mapping[str, Any], metrics_rows: list[dict[str, Any]]
) -> Path:
    """training_curves.png: training loss/reward, evaluation series, and base vs trained held-out score."""
    import matplotlib.pyplot as plt

    fig = training_figure(summary, metrics_rows)
    try:
        with atomic_output_path(path) as tmp:
            fig.savefig(tmp, dpi=110)
    finally:
        plt.close(fig)
    return Path(path)


def training_figure(summary: Mapping[str, Any], metrics_rows: list[dict[str, Any]]) -> Figure:
    """The figure of training_curves.png, one panel per series kind; the caller closes it (`plt.close`)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train, evals = _series(metrics_rows)
    panels = (1 if train else 0) + (1 if evals else 0) + 1
    fig, axes = plt.subplots(1, panels, figsize=(5.2 * panels, 4), squeeze=False)
    ax_iter = iter(axes[0])
    if train:
        _step_panel(next(ax_iter), train, "Training", lambda n: "." if n < 30 else None)
    if evals:
        _step_panel(next(ax_iter), evals, "Evaluation during training", lambda n: "o")
    _held_out_panel(next(ax_iter), summary)
    fig.suptitle(headline(summary), fontsize=10)
    fig.tight_layout()
    return fig


def _step_panel(
    ax: Axes, series: dict[str, list[tuple[float, float]]], title: str, marker: Callable[[int], str | None]
) -> None:
    """Series over the training steps; `marker(n)`: how a series of n points is marked."""
    from matplotlib.ticker import MaxNLocator

    for k, pts in series.items():
        ax.plot([p[0] for p in pts], [p[1] for p in pts], label=k, marker=marker(len(pts)))
    ax.set_title(title)
    ax.set_xlabel("step")
    # Steps are whole numbers: left to itself matplotlib labels a 3-step run 0.00, 0.25, ... 2.00.
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)


def _held_out_panel(ax: Axes, summary: Mapping[str, Any]) -> None:
    """The base and the trained model's held-out score, side by side."""
    if summary_kind(summary) == "score":
        b, t, label = summary["baseline_score"] * 100, summary["trained_score"] * 100, "accuracy (%)"
    else:
        b, t, label = summary["baseline_nll"], summary["trained_nll"], "NLL (lower is better)"
    ax.plot([0, 1], [b, t], color="gray", linestyle="--", zorder=1)
    ax.scatter([0], [b], s=140, marker="o", color="tab:blue", label=f"base: {b:.3g}", zorder=2)
    ax.scatter(
        [1],
        [t],
        s=180,
        marker="*",
        color="tab:green" if summary.get("verdict") == "improved" else "tab:red",
        label=f"trained: {t:.3g}",
        zorder=2,
    )
    ax.set_xticks([0, 1], ["base", "trained"])
    ax.set_xlim(-0.5, 1.5)
    ax.set_ylabel(label)
    ax.set_title("Held-out evaluation")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)


SETTINGS_SHOWN = (
    "task",
    "model_name",
    "renderer_name",
    "backend",
    "dataset",
    "dataset_split",
    "learning_rate",
    "lr_schedule",
    "num_epochs",
    "max_steps",
    "batch_size",
    "lora_rank",
    "max_length",
    "train_on_what",
    "env",
    "group_size",
    "max_tokens",
    "temperature",
    "loss_fn",
    "kl_penalty_coef",
    "seed",
)


def _teacher_lines(summary: Mapping[str, Any]) -> list[str]:
    """Distillation with several teachers: each one measured on its own held-out prompts."""
    teachers = summary.get("teachers")
    if not isinstance(teachers, list) or not teachers:
        return []
    kl = any("baseline_reverse_kl" in t for t in teachers)
    header = "| teacher | dataset | held-out prompts | base NLL | trained NLL |" + (
        " base reverse KL | trained reverse KL |" if kl else ""
    )
    lines = [
        "",
        "## Per teacher (each on its own held-out prompts)",
        "",
        header,
        "|---" * header.count(" |") + "|",
    ]
    for t in teachers:
        cells = [
            t.get("teacher_model"),
            t.get("dataset"),
            t.get("eval_prompts"),
            t.get("baseline_nll"),
            t.get("trained_nll"),
        ]
        if kl:
            cells += [t.get("baseline_reverse_kl"), t.get("trained_reverse_kl")]
        lines.append("| " + " | ".join(_md(fmt_value(c)) for c in cells) + " |")
    return lines


def write_report(
    results_dir: ResultsDir | str | Path,
    summary: Mapping[str, Any],
    comparison: Mapping[str, Any],
    metrics_path: Path | None,
) -> str | None:
    """Write report.md and training_curves.png; return the not-improved warning (None when improved)."""
    results = results_dir if isinstance(results_dir, ResultsDir) else ResultsDir(results_dir)
    results.path.mkdir(parents=True, exist_ok=True)
    warning = None if summary.get("verdict") == "improved" else _not_improved_warning(summary)
    lines = [
        f"# Post-training report: {_md(summary.get('run_name', ''))}",
        "",
        f"**{headline(summary)}**",
        "",
    ]
    if summary.get("score_note"):  # e.g. judged (not verified) scores
        lines += [f"> {_md(summary['score_note'])}", ""]
    verdict_text = (summary.get("improvement") or {}).get("verdict_text")
    lines += [
        f"Verdict: **{summary.get('verdict')}**" + (f" — {_md(verdict_text)}" if verdict_text else ""),
        "",
    ]
    lines += _guard_lines(summary)
    if warning:
        lines += ["> " + line for line in warning.splitlines()] + [""]
    lines += _result_lines(summary) + _teacher_lines(summary) + _example_lines(summary, comparison)
    lines += _run_lines(summary)
    metrics_rows = load_metrics(metrics_path)
    plot_training_curves(results.path / PLOT_FILE, summary, metrics_rows)
    lines += ["", "## Curves", "", f"![training curves]({PLOT_FILE})", ""]
    if not metrics_rows:
        where = f" at {metrics_path}" if metrics_path else ""
        lines.append(f"(no metrics.jsonl found{where}: only the held-out scores are plotted)")
    results.write_text(REPORT_FILE, "\n".join(lines) + "\n")
    return warning


def _guard_lines(summary: Mapping[str, Any]) -> list[str]:
    """The guard's word ('no regression' / 'REGRESSED on ...') and a row per check."""
    guard = summary.get("guard")
    if not isinstance(guard, Mapping):
        return []
    word = "**REGRESSED**" if guard.get("regressed") else "no regression"
    lines = [f"Guard: {word} — {_md(guard.get('text', ''))}", ""]
    checks = guard.get("checks") or []
    if checks:
        lines += ["| guard check | base | trained | change (95% interval, test, n) | regressed | source |"]
        lines += ["|---|---|---|---|---|---|"]
        for c in checks:
            pct = c.get("metric") == "score"
            side = (lambda v: f"{v * 100:.1f}%") if pct else (lambda v: f"{v:.3f}")  # noqa: E731
            lines.append(
                f"| {_md(c['name'])} | {side(c['baseline'])} | {side(c['trained'])} | {_md(c['text'])} | "
                f"{'**yes**' if c['regressed'] else 'no'} | {_md(c['source'])} |"
            )
        lines.append("")
    return lines


def _result_lines(summary: Mapping[str, Any]) -> list[str]:
    """The base and trained score side by side."""
    rl = summary_kind(summary) == "score"
    imp = summary.get("improvement") or compute_improvement(
        summary_kind(summary),
        summary["baseline_score" if rl else "baseline_nll"],
        summary["trained_score" if rl else "trained_nll"],
    )
    lines = ["## Result", "", "| | Base | Trained | Change |", "|---|---|---|---|"]
    if rl:
        b, t, rel = summary["baseline_score"], summary["trained_score"], imp.get("relative")
        rel_text = f"{rel * 100:+.1f}% relative" if rel is not None else "n/a relative"
        label = str(summary.get("score_label") or "accuracy").capitalize()
        lines.append(
            f"| {label} | {b * 100:.1f}% | {t * 100:.1f}% | {(t - b) * 100:+.1f} points ({rel_text}) |"
        )
    else:
        b, t = summary["baseline_nll"], summary["trained_nll"]
        lines.append(f"| Mean NLL | {b:.4f} | {t:.4f} | {t - b:+.4f} ({imp.get('description', '')}) |")
    return lines


def _example_lines(summary: Mapping[str, Any], comparison: Mapping[str, Any]) -> list[str]:
    """The paired per-example counts and the most improved and regressed examples."""
    lines = [
        "",
        "## Per example",
        "",
        f"Paired examples: {comparison.get('paired', 0)} — improved **{comparison.get('improved', 0)}**, "
        f"regressed **{comparison.get('regressed', 0)}**, unchanged {comparison.get('unchanged', 0)}"
        + (f", failed evaluation {comparison['errors']}" if comparison.get("errors") else ""),
        "",
    ]
    rl = summary_kind(summary) == "score"
    for title, key in (("Most improved", "top_improved"), ("Most regressed", "top_regressed")):
        entries = comparison.get(key) or []
        if entries:
            lines += [f"### {title}", "", *_example_table(entries, rl), ""]
    return lines


def _example_table(entries: list[Mapping[str, Any]], rl: bool) -> list[str]:
    if rl and "base_margin" in entries[0]:
        return ["| index | prompt | base margin | trained margin |", "|---|---|---|---|"] + [
            f"| {e['index']} | {_md(e.get('prompt', ''))} | {fmt_value(e.get('base_margin'))} | "
            f"{fmt_value(e.get('trained_margin'))} |"
            for e in entries
        ]
    if rl:
        header = [
            "| index | question | ground truth | base answer | trained answer |",
            "|---|---|---|---|---|",
        ]
        return header + [
            f"| {e['index']} | {_md(e.get('question', ''))} | {_md(e.get('ground_truth', ''))} | "
            f"{_md(e.get('base_answer', ''))} | {_md(e.get('trained_answer', ''))} |"
            for e in entries
        ]
    return ["| index | prompt | base NLL | trained NLL | change |", "|---|---|---|---|---|"] + [
        f"| {e['index']} | {_md(e.get('prompt', ''))} | {e['base']:.3f} | {e['trained']:.3f} | {-e['delta']:+.3f} |"
        for e in entries
    ]


def _run_lines(summary: Mapping[str, Any]) -> list[str]:
    """What ran where (ids, paths, sizes, durations) and every setting."""
    renderer = summary.get("renderer") or {}
    run_facts = [
        ("task type", summary.get("task_type")),
        ("method", summary.get("method")),
        ("model", summary.get("model")),
        ("backend", summary.get("backend")),
        ("renderer", f"{renderer.get('name')} ({renderer.get('source')})" if renderer else None),
        ("tinker run id", summary.get("tinker_run_id")),
        ("log path", summary.get("log_path")),
        ("W&B", summary.get("wandb_url")),
    ]
    wv = summary.get("wandb_verification")
    if isinstance(wv, Mapping):
        run_facts.append(("W&B verified", f"{wv.get('verified')} — {wv.get('detail', '')}"))
    run_facts += list((summary.get("sizes") or {}).items())
    for k, v in (summary.get("durations_seconds") or {}).items():
        run_facts.append((f"{k} (s)", f"{v:.1f}" if is_number(v) else v))
    lines = ["## Run", "", "| | |", "|---|---|"] + [
        f"| {_md(k)} | {_md(v)} |" for k, v in run_facts if v is not None
    ]
    hp = summary.get("hyperparameters") or {}
    if hp:
        lines += ["", "## Settings", "", "| setting | value |", "|---|---|"]
        shown = [k for k in SETTINGS_SHOWN if k in hp] + [k for k in hp if k not in SETTINGS_SHOWN]
        lines += [f"| {_md(k)} | {_md(fmt_value(hp[k]))} |" for k in shown]
    return lines
