"""`posttrain runs`: the runs in a results folder as a table, and two runs compared.

A results folder holds the current run at its top level and each earlier one in `previous/<name>/` (moved there
by `ResultsDir.prepare`). `posttrain runs [DIR]` lists them all; `posttrain runs A B` compares two (run names in
the results folder, or paths to results folders): the settings that differ and, example by example (matched by
`index`), where B's trained model did better, worse or the same as A's.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from posttrain.errors import UserError
from posttrain.pipeline.results.rows import as_dict, is_number, summary_kind
from posttrain.pipeline.results.store import SUMMARY_FILE, TRAINED_FILE
from posttrain.pipeline.results.summary import compare_examples, judge_improvement
from posttrain.pipeline.results.verdict import interval_bounds

DEFAULT_DIR = "results"
USAGE = "usage: posttrain runs [RESULTS_DIR] | posttrain runs A B [results_dir=DIR]"


class RunsError(UserError):
    """A folder without runs, an unknown run name, an unreadable summary.json."""


@dataclass(frozen=True)
class Run:
    name: str
    where: str  # "." or "previous/<name>"
    path: Path
    summary: dict[str, Any]


def load_summary(folder: Path) -> dict[str, Any]:
    path = folder / SUMMARY_FILE
    try:
        summary = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise RunsError(f"{path}: cannot read it ({exc.strerror or exc})") from None
    except ValueError as exc:
        raise RunsError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(summary, dict):
        raise RunsError(f"{path}: not a JSON object")
    return summary


def _run(folder: Path, where: str) -> Run:
    summary = load_summary(folder)
    name = summary.get("run_name")
    return Run(name if isinstance(name, str) and name else folder.name, where, folder, summary)


def find_runs(results_dir: str | Path) -> list[Run]:
    """The current run (if any), then each previous/<name>/ run, newest first."""
    root = Path(results_dir)
    if not root.is_dir():
        raise RunsError(f"{root}: no such folder")
    runs = [_run(root, ".")] if (root / SUMMARY_FILE).is_file() else []
    previous = [p for p in (root / "previous").glob("*/") if (p / SUMMARY_FILE).is_file()]
    previous.sort(key=lambda p: ((p / SUMMARY_FILE).stat().st_mtime, p.name), reverse=True)
    runs += [_run(p, f"previous/{p.name}") for p in previous]
    if not runs:
        raise RunsError(f"{root}: no runs here (no {SUMMARY_FILE}, nor previous/*/{SUMMARY_FILE})")
    return runs


def resolve_run(spec: str, results_dir: str | Path = DEFAULT_DIR) -> Run:
    """A path to a results folder, or a run's name (or previous/ folder name) in `results_dir`."""
    path = Path(spec)
    if (path / SUMMARY_FILE).is_file():
        return _run(path, str(path))
    root = Path(results_dir)
    if (root / SUMMARY_FILE).is_file() and load_summary(root).get("run_name") == spec:
        return _run(root, ".")
    if "/" not in spec and (root / "previous" / spec / SUMMARY_FILE).is_file():
        return _run(root / "previous" / spec, f"previous/{spec}")
    if root.is_dir():
        for run in find_runs(root):
            if run.name == spec:
                return run
    raise RunsError(f"{spec}: no run of that name in {root}/ and no {SUMMARY_FILE} in a folder {path}")


# ------------------------------------------------------------------------------------------- the table


def _get(d: Any, *keys: str) -> Any:
    for k in keys:
        if not isinstance(d, Mapping):
            return None
        d = d.get(k)
    return d


def _short(text: Any, n: int = 40) -> str:
    s = " ".join(str(text).split())
    return s if len(s) <= n else s[: n - 1] + "…"


def _data(summary: Mapping[str, Any], hp: Mapping[str, Any]) -> str:
    """The training data in a few words: a file by its name, a dataset by its id."""
    data = _get(summary, "dataset", "source") or _get(summary, "dataset", "name") or hp.get("dataset")
    if not data:
        return "-"
    first = str(data).split(" (")[0]
    return _short(Path(first).name if "/" in first and " " not in first else data, 32)


def _metric(summary: Mapping[str, Any], key: str) -> str:
    """One side's headline number: accuracy as a percentage, NLL with 3 decimals."""
    if summary_kind(summary) == "score" and is_number(summary.get(f"{key}_score")):
        return f"{summary[f'{key}_score'] * 100:.1f}%"
    value = summary.get(f"{key}_nll", summary.get(key))  # a failed run records "baseline" / "trained"
    return f"{value:.3f}" if is_number(value) else "-"


def _interval(summary: Mapping[str, Any]) -> str:
    """' [+2.8, +29.4] pts': the verdict's 95% interval of the difference (better is positive)."""
    imp = summary.get("improvement") if isinstance(summary.get("improvement"), Mapping) else {}
    bounds = interval_bounds(imp)
    return f" {bounds} {'pts' if imp.get('unit') == 'points' else 'nats'}" if bounds else ""


def _label(summary: Mapping[str, Any]) -> str:
    if summary_kind(summary) == "score":
        return str(summary.get("score_label") or "accuracy")
    return "NLL" if "baseline_nll" in summary else ""


def row_cells(run: Run) -> dict[str, str]:
    s = run.summary
    hp = s.get("hyperparameters") if isinstance(s.get("hyperparameters"), Mapping) else {}
    wall = _get(s, "durations_seconds", "total")
    tokens = _get(s, "tokens", "trained_reported") or _get(s, "tokens", "estimate", "train")
    cost = _get(s, "tinker_cost_estimate", "usd")
    label = _label(s)
    return {
        "run": run.name,
        "where": run.where,
        "method": str(s.get("method") or "-"),
        "model": _short(s.get("model") or hp.get("model_name") or "-"),
        "data": _data(s, hp),
        "base -> trained": f"{_metric(s, 'baseline')} -> {_metric(s, 'trained')}"
        + (f" {_short(label, 20)}" if label else ""),
        "verdict": str(s.get("verdict") or s.get("status") or "-") + _interval(s),
        "wall time": _duration(wall) if is_number(wall) else "-",
        "tokens": f"{int(tokens):,}" if is_number(tokens) else "-",
        "est. cost": f"${cost:,.2f}" if is_number(cost) else "-",
    }


def _duration(seconds: float) -> str:
    m, s = divmod(round(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s" if m else f"{seconds:.1f}s"


def _print_table(title: str, header: list[str], rows: list[list[str]]) -> None:
    from rich import box
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title, box=box.SIMPLE_HEAD, title_justify="left", show_edge=False)
    for h in header:
        table.add_column(h, overflow="fold")
    for r in rows:
        table.add_row(*r)
    console = Console(width=None if sys.stdout.isatty() else 200, highlight=False)
    with console.capture() as captured:
        console.print(table)
    print("\n".join(line.rstrip() for line in captured.get().splitlines()))


def print_runs(results_dir: str | Path) -> None:
    runs = find_runs(results_dir)
    cells = [row_cells(r) for r in runs]
    header = list(cells[0])
    _print_table(f"Runs in {Path(results_dir)}/", header, [[c[h] for h in header] for c in cells])


# ------------------------------------------------------------------------------------------- comparing


def _settings(summary: Mapping[str, Any]) -> dict[str, Any]:
    hp = summary.get("hyperparameters") if isinstance(summary.get("hyperparameters"), Mapping) else {}
    top = {k: summary.get(k) for k in ("method", "model", "backend") if summary.get(k) is not None}
    return {**top, **hp}


def _value(v: Any) -> str:
    if v is None:
        return "-"
    return _short(v if isinstance(v, str) else json.dumps(v, default=str), 60)


def differing_settings(a: Mapping[str, Any], b: Mapping[str, Any]) -> list[tuple[str, Any, Any]]:
    """(setting, A's value, B's value) for each setting that differs (the run names always do: left out)."""
    sa, sb = _settings(a), _settings(b)
    keys = list(sa) + [k for k in sb if k not in sa]
    return [(k, sa.get(k), sb.get(k)) for k in keys if sa.get(k) != sb.get(k) and k != "run_name"]


def _trained_rows(run: Run) -> list[dict[str, Any]] | None:
    path = run.path / TRAINED_FILE
    if not path.is_file():
        return None
    rows = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise RunsError(f"{path}: cannot read it ({exc})") from None
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            raise RunsError(f"{path}: line {n} is not valid JSON") from None
        if isinstance(row, dict) and isinstance(row.get("index"), int):
            rows.append(row)
    return rows


def compare_runs(a: Run, b: Run, top: int = 3) -> dict[str, Any]:
    """The settings that differ and B's trained rows against A's, paired by index (improved: B did better)."""
    result: dict[str, Any] = {"settings": differing_settings(a.summary, b.summary), "examples": None}
    kinds = {summary_kind(a.summary), summary_kind(b.summary)}
    rows_a, rows_b = _trained_rows(a), _trained_rows(b)
    if rows_a is None or rows_b is None:
        missing = a if rows_a is None else b
        result["note"] = f"no per-example comparison: {missing.path / TRAINED_FILE} does not exist"
    elif len(kinds) != 1:
        result["note"] = "no per-example comparison: one run measures NLL, the other a score"
    else:
        comparison = compare_examples(rows_a, rows_b, kinds.pop(), top=top)
        by_a = {r["index"]: as_dict(r) for r in rows_a}
        text = ("question", "prompt")
        differ = sum(
            1 for r in rows_b if r["index"] in by_a and any(r.get(k) != by_a[r["index"]].get(k) for k in text)
        )
        result["examples"] = comparison
        if differ:
            result["note"] = (
                f"{differ} examples with the same index have different prompts: different eval sets?"
            )
    return result


def _example_rows(entries: list[Mapping[str, Any]]) -> list[list[str]]:
    rows = []
    for e in entries:
        text = e.get("question", e.get("prompt", ""))
        if "base_reward" in e:
            va, vb = _value(e["base_reward"]), _value(e["trained_reward"])
        elif "base_margin" in e:
            va, vb = _value(e["base_margin"]), _value(e["trained_margin"])
        elif isinstance(e.get("base"), bool):
            va, vb = ("correct" if e["base"] else "wrong"), ("correct" if e["trained"] else "wrong")
        else:
            va, vb = f"{e['base']:.3f}", f"{e['trained']:.3f}"
        rows.append([str(e["index"]), _short(text, 60), va, vb, f"{e['delta']:+.3g}"])
    return rows


def print_comparison(a: Run, b: Run) -> None:
    result = compare_runs(a, b)
    for tag, run in (("A", a), ("B", b)):
        cells = row_cells(run)
        print(
            f"{tag}: {run.name} ({run.path}) {cells['method']}, {cells['base -> trained']}, {cells['verdict']}"
        )
    print()
    if result["settings"]:
        _print_table(
            "Settings that differ",
            ["setting", "A", "B"],
            [[k, _value(va), _value(vb)] for k, va, vb in result["settings"]],
        )
    else:
        print("Settings: the same")
    print()
    c = result["examples"]
    if c is not None:
        print(
            f"Per example (B's trained model against A's, {c['paired']} paired by index): B better on "
            f"{c['improved']}, worse on {c['regressed']}, the same on {c['unchanged']}"
            + (f", failed on either side {c['errors']}" if c["errors"] else "")
        )
        # B against A as a verdict: is B's difference more than noise on these examples?
        v = judge_improvement(c["kind"], c)
        numbers = v["text"].split(f"): {v['verdict']}")[0] + ")"
        word = {"improved": "B is better", "not improved": "B is not better", "inconclusive": "inconclusive"}
        print(f"B against A: {numbers}: {word[v['verdict']]}")
        header = ["index", "prompt", "A", "B", "change (>0: B better)"]
        for title, key in (("Largest gains in B", "top_improved"), ("Largest losses in B", "top_regressed")):
            if c[key]:
                print()
                _print_table(title, header, _example_rows(c[key]))
    if result.get("note"):
        print(f"note: {result['note']}")


def runs_main(argv: list[str]) -> int:
    """`posttrain runs [RESULTS_DIR]` / `posttrain runs A B [results_dir=DIR]`; bad input: one line, exit 2."""
    if any(a in ("-h", "--help") for a in argv):
        print(USAGE)
        return 0
    opts = [a for a in argv if a.startswith("results_dir=")]
    args = [a for a in argv if a not in opts]
    results_dir = opts[-1].split("=", 1)[1] if opts else DEFAULT_DIR
    try:
        if len(args) <= 1:
            print_runs(args[0] if args else results_dir)
        elif len(args) == 2:
            print_comparison(resolve_run(args[0], results_dir), resolve_run(args[1], results_dir))
        else:
            raise RunsError(f"expected a results folder or two runs, got {len(args)} arguments ({USAGE})")
    except RunsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    return 0
