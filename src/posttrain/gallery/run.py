"""Running examples: each stage a `posttrain train` subprocess in its own results folder, then the table
(`gallery.md`, `gallery.json`) and `posttrain examples` itself."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from posttrain.gallery.examples import EXAMPLES, FROM_STAGE, Example, Stage
from posttrain.pipeline.results.verdict import interval_bounds
from posttrain.util import PACKAGE_DATA, atomic_write_text, processor

# A stage's `posttrain train` finished, whatever its verdict: improved, not improved, inconclusive, guard regressed.
FINISHED_CODES = (0, 1, 3, 4)

USAGE = """usage: posttrain examples [list | NAME ... | all] [out=DIR] [key=value ...]

  list          the examples, their commands and targets
  NAME ...      run these examples (each in DIR/NAME/, default DIR: gallery/)
  all           run every example, then write DIR/gallery.md and DIR/gallery.json
  key=value     added to every run's settings (e.g. max_steps=1 to check the commands)
"""


def command(example: Example) -> str:
    """The example's runs as a user would type them (for the list and the table)."""
    runs = []
    for stage in example.stages:
        shown = [
            a.replace("{folder}", f"gallery/{example.name}")
            .replace(str(PACKAGE_DATA), "src/posttrain/data")
            .replace(f"{FROM_STAGE}rl}}", "tinker://<the rl run's checkpoint_path>")
            for a in stage.args
        ]
        runs.append(" ".join(["uv run python train.py", *(f"'{a}'" if "," in a else a for a in shown)]))
    return " && ".join(runs)


def machine() -> dict[str, Any]:
    """The processor, the core count and the date: what a gallery number holds for."""
    return {**processor(), "cores": os.cpu_count(), "date": datetime.now(UTC).isoformat(timespec="seconds")}


def _stage_args(
    example: Example, stage: Stage, folder: Path, done: dict[str, dict], extra: list[str]
) -> list[str]:
    args = []
    for arg in stage.args:
        arg = arg.replace("{folder}", str(folder))
        if FROM_STAGE in arg:
            key, _, ref = arg.partition("=")
            source = done[ref.removeprefix(FROM_STAGE).rstrip("}")]
            arg = f"{key}={source['checkpoint_path']}"
        args.append(arg)
    given = {a.split("=", 1)[0] for a in extra}
    return [
        *(a for a in args if a.split("=", 1)[0] not in given),
        *extra,
        f"results_dir={folder / stage.name}",
        f"run_name={example.name}-{stage.name}",
    ]


def run_example(example: Example, out: Path, extra: list[str]) -> dict[str, Any]:
    """Every stage in order, each a `posttrain train` subprocess; the table row of the last stage."""
    folder = out / example.name
    if example.make_data is not None:
        example.make_data(folder)
    done: dict[str, dict] = {}
    started = time.monotonic()
    for n, stage in enumerate(example.stages, 1):
        print(f"examples: {example.name}: stage {n}/{len(example.stages)}: {stage.name}", flush=True)
        args = _stage_args(example, stage, folder, done, extra)
        code = _train(args)
        summary_file = folder / stage.name / "summary.json"
        if code not in FINISHED_CODES or not summary_file.exists():
            return _row(example, None, time.monotonic() - started, f"stage {stage.name} failed (exit {code})")
        done[stage.name] = json.loads(summary_file.read_text())
        if done[stage.name].get("status") == "failed":
            return _row(
                example,
                None,
                time.monotonic() - started,
                f"stage {stage.name}: {done[stage.name].get('error')}",
            )
    reported = example.reported or (example.stages[-1].name,)
    return _row(example, {name: done[name] for name in reported}, time.monotonic() - started, None)


def _train(args: list[str]) -> int:
    """One `posttrain train` run; on Ctrl-C (or SIGTERM) it gets exactly one SIGINT and stops as it does alone
    (partial results, its engine stopped), and then this command stops too."""
    # Its own session: a terminal's Ctrl-C reaches only this process, which passes it on once.
    proc = subprocess.Popen(
        [sys.executable, "-m", "posttrain.cli.main", "train", *args], start_new_session=True
    )
    try:
        return proc.wait()
    except KeyboardInterrupt:
        proc.send_signal(signal.SIGINT)
        proc.wait()
        raise


def _row(
    example: Example, summaries: dict[str, dict] | None, seconds: float, error: str | None
) -> dict[str, Any]:
    """The table row: the reported stages' headlines (named when there are several), met when each clears the bar."""
    row: dict[str, Any] = {
        "example": example.name,
        "title": example.title,
        "command": f"uv run posttrain examples {example.name}",
        "runs": command(example),
        "target": example.target,
        "bar": example.bar,
        "wall_seconds": round(seconds, 1),
    }
    if summaries is None:
        return row | {"result": None, "met": False, "error": error}
    several = len(summaries) > 1
    result = "; ".join(
        f"{name}: {_stage_result(s)}" if several else _stage_result(s) for name, s in summaries.items()
    )
    interval = "; ".join(
        f"{name}: {_interval(s)}" if several else _interval(s) for name, s in summaries.items()
    )
    guard = "; ".join(f"{name}: {_guard(s)}" if several else _guard(s) for name, s in summaries.items())
    # The bar is met when the point estimate reaches it and the verdict is `improved`: the gain's 95% interval
    # excludes no change, so a bar cleared by noise is not met.
    met = all(example.met(s) and s.get("verdict") == "improved" for s in summaries.values())
    return row | {
        "result": result,
        "interval": interval,
        "guard": guard,
        "met": met,
        "notes": list(example.notes),
    }


def _interval(summary: dict) -> str:
    """'+20.0 points [+2.8, +29.4], McNemar p = 0.021, n = 50: improved'."""
    imp = summary.get("improvement") or {}
    bounds = interval_bounds(imp)
    if bounds is None:
        return f"too few examples to tell (n = {imp.get('n')}): {summary.get('verdict')}"
    scale, unit = (100.0, " points") if imp.get("unit") == "points" else (1.0, " nats")
    test = "McNemar" if imp.get("test") == "mcnemar_exact" else "permutation"
    p = imp.get("p_value", 1.0)
    return (
        f"{imp['difference'] * scale:+.{1 if scale == 100.0 else 3}f}{unit} {bounds}, "
        f"{test} p {'< 0.001' if p < 0.001 else f'= {p:.3f}'}, n = {imp.get('n')}: {summary.get('verdict')}"
    )


def _guard(summary: dict) -> str:
    """'no regression (general chat NLL -0.054 [-0.137, +0.040])' or 'REGRESSED: task accuracy ... -31.2 points'."""
    guard = summary.get("guard") or {}
    checks = guard.get("checks") or []
    if not checks:
        return "-"
    parts = []
    for c in checks:
        scale, digits = (100.0, 1) if c.get("metric") == "score" else (1.0, 3)
        low, high = c["interval"]
        parts.append(
            f"{c['name']} {c['difference'] * scale:+.{digits}f} [{low * scale:+.{digits}f}, {high * scale:+.{digits}f}]"
        )
    word = "REGRESSED" if guard.get("regressed") else "no regression"
    length = guard.get("answer_chars")
    chars = f"; answers {length['baseline']:.0f} -> {length['trained']:.0f} chars" if length else ""
    return f"{word} ({'; '.join(parts)}){chars}"


def _stage_result(summary: dict) -> str:
    """A stage's headline, and what the run measured beside it: the task accuracy (distillation's student),
    HumanEval (code RL)."""
    result = summary["headline"]
    base, trained = summary.get("baseline_task_accuracy"), summary.get("trained_task_accuracy")
    if base is not None and trained is not None:
        result += f", task accuracy {base:.0%} → {trained:.0%}"
    humaneval = summary.get("humaneval_score") or {}
    if humaneval.get("baseline") is not None and humaneval.get("trained") is not None:
        result += f"; HumanEval pass@1 {humaneval['baseline']:.1%} → {humaneval['trained']:.1%}"
    return result


def write_table(rows: list[dict[str, Any]], out: Path) -> None:
    facts = machine()
    atomic_write_text(out / "gallery.json", json.dumps({"machine": facts, "examples": rows}, indent=2) + "\n")
    lines = [
        f"Measured {facts['date']} on {facts['cpu']} ({facts['cores']} cores; {', '.join(facts['cpu_flags'])})",
        "",
        "| example | base -> trained | change, 95% interval, test, n: verdict | guard | document's example | bar "
        "| met | wall |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        result = r["result"] or f"failed: {r.get('error')}"
        lines.append(
            f"| {r['example']} | {result} | {r.get('interval', '-')} | {r.get('guard', '-')} | {r['target']} | "
            f"{r['bar']} | {'yes' if r['met'] else 'no'} | {r['wall_seconds'] / 60:.1f} min |"
        )
    lines += ["", "Each example is `uv run posttrain examples NAME`; its runs:", ""]
    lines += [f"- {r['example']}: `{r['runs']}`" for r in rows]
    atomic_write_text(out / "gallery.md", "\n".join(lines) + "\n")


def examples_main(argv: list[str]) -> int:
    names = [a for a in argv if "=" not in a]
    settings = [a for a in argv if "=" in a]
    out = Path(next((a.split("=", 1)[1] for a in settings if a.startswith("out=")), "gallery"))
    extra = [a for a in settings if not a.startswith("out=")]
    if not names or names == ["list"] or names[0] in ("-h", "--help"):
        print(USAGE)
        for e in EXAMPLES.values():
            print(f"{e.name}: {e.title}\n  document: {e.target}; bar: {e.bar}\n  {command(e)}")
            for note in e.notes:
                print(f"  note: {note}")
        return 0
    chosen = list(EXAMPLES) if names == ["all"] else names
    unknown = [n for n in chosen if n not in EXAMPLES]
    if unknown:
        print(
            f"error: no example named {', '.join(unknown)}; examples: {', '.join(EXAMPLES)}, all",
            file=sys.stderr,
        )
        return 2
    try:
        rows = [run_example(EXAMPLES[n], out, extra) for n in chosen]
    except KeyboardInterrupt:
        print(
            "interrupted: examples stopped (the interrupted run kept its partial results in its folder)",
            file=sys.stderr,
        )
        return 130
    write_table(rows, out)
    for r in rows:
        print(
            f"{r['example']}: {r['result'] or r.get('error')} ({'meets' if r['met'] else 'misses'} {r['bar']})"
        )
    print(f"table: {out / 'gallery.md'}")
    return 0 if all(r["result"] for r in rows) else 1
