"""report.html: the run's report in one self-contained page (inline CSS and JS, the curves as a data URI).

Every held-out example is shown with the base and the trained model side by side, classified improved /
regressed / unchanged exactly as `compare_examples` counts it (SFT: lower NLL is better; RL: higher score is
better), with filter buttons and sorting by change. The page reads `#filter=regressed&sort=worst` from the URL.
"""

from __future__ import annotations

import base64
import html
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from posttrain.pipeline.results.report import SETTINGS_SHOWN, fmt_value
from posttrain.pipeline.results.rows import MetricKind, as_dict, is_number, metric_value, summary_kind
from posttrain.pipeline.results.store import BASE_FILE, PLOT_FILE, TRAINED_FILE, ResultsDir
from posttrain.pipeline.results.summary import headline, paired_entry

HTML_FILE = "report.html"
OUTCOMES = ("improved", "regressed", "unchanged", "failed")


def _e(value: Any) -> str:
    return html.escape("" if value is None else str(value), quote=True)


def _read_rows(path: Path) -> list[dict[str, Any]]:
    """A results JSONL file's rows ([] when missing; unparsable lines are skipped)."""
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict) and isinstance(row.get("index"), int):
            rows.append(row)
    return rows


def classify(base: dict | None, trained: dict | None, kind: MetricKind) -> tuple[str, float | None]:
    """(outcome, change) of one example: change > 0 is better, whatever the metric's direction."""
    if (
        base is None
        or trained is None
        or metric_value(base, kind) is None
        or metric_value(trained, kind) is None
    ):
        return "failed", None
    entry, tol = paired_entry(base["index"], base, trained, kind)
    delta = entry["delta"]
    return ("improved" if delta > tol else "regressed" if delta < -tol else "unchanged"), delta


def _pre(label: str, text: Any, cls: str = "") -> str:
    if text is None or text == "":
        return ""
    return f'<div class="field {cls}"><h4>{_e(label)}</h4><pre>{_e(text)}</pre></div>'


def _transcript(turns: Any) -> str:
    if not isinstance(turns, list) or not turns:
        return ""
    items = []
    for t in turns:
        t = t if isinstance(t, Mapping) else {"turn": t}
        cells = "".join(
            f"<dt>{_e(k)}</dt><dd><pre>{_e(fmt_value(v))}</pre></dd>" for k, v in t.items() if k != "turn"
        )
        items.append(f"<li><b>turn {_e(t.get('turn', ''))}</b><dl>{cells}</dl></li>")
    summary = f"<summary>transcript ({len(turns)} turns)</summary>"
    return f'<details class="transcript">{summary}<ol>{"".join(items)}</ol></details>'


def _score(row: dict, kind: MetricKind) -> str:
    """The per-example metric of one side, as text."""
    if row.get("error"):
        return f"failed: {row['error']}"
    if kind == "nll":
        return f"NLL {fmt_value(row.get('nll'))}"
    parts = ["correct" if row.get("correct") else "wrong"]
    for key in ("margin", "reward"):
        if is_number(row.get(key)):
            parts.append(f"{key} {fmt_value(row[key])}")
    return " · ".join(parts)


def _details(details: Any) -> str:
    if not isinstance(details, Mapping) or not details:
        return ""
    return '<p class="muted">' + _e(", ".join(f"{k}: {fmt_value(v)}" for k, v in details.items())) + "</p>"


def _side(title: str, row: dict | None, kind: MetricKind, reference: Any) -> str:
    if row is None:
        return f'<div class="side"><h3>{_e(title)}</h3><p class="muted">not evaluated</p></div>'
    answer = row.get("completion")
    if kind == "nll" and answer == reference:  # SFT: the reference completion is what was scored
        answer = row.get("answer")  # the model's own greedy reply, where the run sampled one
    body = [
        f'<p class="score">{_e(_score(row, kind))}</p>',
        _details(row.get("details")),
        _pre("answer", answer),
        _pre("extracted answer", row.get("extracted_answer"))
        if row.get("extracted_answer") != answer
        else "",
        _pre("verifier error", row.get("verifier_error"), "bad"),
        _transcript(row.get("transcript")),
    ]
    return f'<div class="side"><h3>{_e(title)}</h3>{"".join(body)}</div>'


def _example(index: int, base: dict | None, trained: dict | None, kind: MetricKind) -> tuple[str, str]:
    """(outcome, the example's <article>)."""
    outcome, delta = classify(base, trained, kind)
    row = base or trained or {}
    prompt = row.get("question", row.get("prompt"))
    reference = row.get("ground_truth") if "question" in row else row.get("chosen", row.get("completion"))
    ref_label = "chosen" if "chosen" in row else "reference"
    change = "" if delta is None else f" · change {delta:+.4g}"
    teacher = f" · teacher {row['teacher']}" if row.get("teacher") else ""
    return outcome, (
        f'<article class="ex {outcome}" id="ex-{index}" data-index="{index}" data-outcome="{outcome}" '
        f'data-delta="{"" if delta is None else repr(float(delta))}">'
        f'<header><b>#{index}</b> <span class="tag">{outcome}</span>{_e(change + teacher)}</header>'
        + _pre("prompt", prompt)
        + _pre(ref_label, reference)
        + _pre("rejected", row.get("rejected"))
        + '<div class="sides">'
        + _side("base", base, kind, reference)
        + _side("trained", trained, kind, reference)
        + "</div></article>"
    )


def _table(pairs: list[tuple[str, Any]]) -> str:
    rows = "".join(f"<tr><th>{_e(k)}</th><td>{_e(fmt_value(v))}</td></tr>" for k, v in pairs if v is not None)
    return f"<table>{rows}</table>"


def _run_pairs(summary: Mapping[str, Any]) -> list[tuple[str, Any]]:
    renderer = summary.get("renderer") or {}
    pairs = [
        (k, summary.get(k)) for k in ("run_name", "method", "task_type", "model", "backend", "created_at")
    ]
    pairs.append(("renderer", renderer.get("name") if isinstance(renderer, Mapping) else renderer))
    for group in ("dataset", "sizes", "durations_seconds"):
        value = summary.get(group)
        if isinstance(value, Mapping):
            pairs += [(f"{group.removesuffix('_seconds')}: {k}", v) for k, v in value.items()]
    return pairs


def _guard_word(summary: Mapping[str, Any]) -> tuple[str, str]:
    """The guard's word and its badge class."""
    guard = summary.get("guard")
    if not isinstance(guard, Mapping) or not guard.get("checks"):
        return "not evaluated", "unsure"
    return ("REGRESSED", "bad") if guard.get("regressed") else ("no regression", "good")


def render_html(
    summary: Mapping[str, Any], base_rows: list[dict], trained_rows: list[dict], plot: bytes | None
) -> str:
    """The page as a string (every text escaped)."""
    kind = summary_kind(summary)
    base = {r["index"]: r for r in map(as_dict, base_rows)}
    trained = {r["index"]: r for r in map(as_dict, trained_rows)}
    examples = [_example(i, base.get(i), trained.get(i), kind) for i in sorted(set(base) | set(trained))]
    counts = {o: sum(outcome == o for outcome, _ in examples) for o in OUTCOMES}
    buttons = "".join(
        f'<button type="button" data-filter="{o}">{o} ({counts[o] if o != "all" else len(examples)})</button>'
        for o in ("all", *OUTCOMES)
        if o in ("all", "improved", "regressed", "unchanged") or counts[o]
    )
    verdict = str(summary.get("verdict") or summary.get("status") or "")
    hp = summary.get("hyperparameters") or {}
    settings = [(k, hp[k]) for k in SETTINGS_SHOWN if k in hp] + [
        (k, v) for k, v in hp.items() if k not in SETTINGS_SHOWN
    ]
    head = summary.get("headline") or (
        headline(summary) if "trained_score" in summary or "trained_nll" in summary else ""
    )
    image = (
        f'<img alt="training curves" src="data:image/png;base64,{base64.b64encode(plot).decode("ascii")}">'
        if plot
        else '<p class="muted">no training_curves.png</p>'
    )
    better = "lower NLL is better" if kind == "nll" else "higher score is better"
    return _TEMPLATE.format(
        title=_e(f"Post-training report: {summary.get('run_name', '')}"),
        headline=_e(head),
        verdict=_e(verdict),
        verdict_class={"improved": "good", "inconclusive": "unsure"}.get(verdict, "bad"),
        verdict_text=_e((summary.get("improvement") or {}).get("verdict_text") or ""),
        guard=_e((summary.get("guard") or {}).get("text") or ""),
        guard_class=_guard_word(summary)[1],
        guard_word=_guard_word(summary)[0],
        note=_e(summary.get("score_note") or ""),
        run=_table(_run_pairs(summary)),
        settings=_table(settings),
        image=image,
        better=_e(better),
        buttons=buttons,
        examples="\n".join(article for _, article in examples) or '<p class="muted">no per-example rows</p>',
        css=_CSS,
        js=_JS,
    )


def write_report_html(results: ResultsDir | str | Path, summary: Mapping[str, Any]) -> Path:
    """Write report.html from summary and the base/trained rows and training curves in the folder."""
    results = results if isinstance(results, ResultsDir) else ResultsDir(results)
    plot_path = results.path / PLOT_FILE
    plot = plot_path.read_bytes() if plot_path.is_file() else None
    page = render_html(
        summary, _read_rows(results.path / BASE_FILE), _read_rows(results.path / TRAINED_FILE), plot
    )
    return results.write_text(HTML_FILE, page)


_CSS = """
body{font:14px/1.45 system-ui,sans-serif;margin:0 auto;max-width:1200px;padding:1em 2em;color:#222}
h1{font-size:1.4em}.headline{font-size:1.2em;font-weight:600}
.verdict{display:inline-block;padding:.1em .6em;border-radius:1em;color:#fff}
.verdict.good{background:#2a7d2a}.verdict.bad{background:#b03030}.verdict.unsure{background:#a06a00}
table{border-collapse:collapse;margin:.5em 0}th,td{border:1px solid #ddd;padding:2px 8px;text-align:left;
vertical-align:top}th{background:#f6f6f6;font-weight:500}
details.box>summary{cursor:pointer;font-weight:600;margin:.6em 0}img{max-width:100%}
.controls{position:sticky;top:0;background:#fff;padding:.5em 0;border-bottom:1px solid #ddd;z-index:1}
button{margin-right:.3em;padding:.3em .8em;border:1px solid #999;border-radius:4px;background:#fff;cursor:pointer}
button[aria-pressed=true]{background:#333;color:#fff}
.ex{border:1px solid #ccc;border-left-width:6px;border-radius:4px;margin:.8em 0;padding:.5em .8em}
.ex.improved{border-left-color:#2a7d2a}.ex.regressed{border-left-color:#b03030}
.ex.unchanged{border-left-color:#999}.ex.failed{border-left-color:#d08000}
.tag{font-weight:600}.improved .tag{color:#2a7d2a}.regressed .tag{color:#b03030}
.sides{display:grid;grid-template-columns:1fr 1fr;gap:1em}.side{min-width:0}
h3{margin:.4em 0;font-size:1em}h4{margin:.3em 0 .1em;font-size:.85em;color:#555}
pre{white-space:pre-wrap;word-break:break-word;background:#f7f7f7;padding:.4em;margin:0;max-height:24em;
overflow:auto}.score{font-weight:600;margin:.2em 0}.muted{color:#777}.bad pre{background:#fdecec}
dl{margin:0}dt{font-size:.8em;color:#555}dd{margin:0 0 .2em 0}
"""

# Filter and sort the examples; the state lives in the URL hash (#filter=regressed&sort=worst).
_JS = """
(function () {
  var list = document.getElementById("examples");
  var items = Array.prototype.slice.call(list.querySelectorAll("article.ex"));
  function state() {
    var p = new URLSearchParams(location.hash.replace(/^#/, ""));
    return {filter: p.get("filter") || "all", sort: p.get("sort") || "index"};
  }
  function idx(el) { return parseInt(el.dataset.index, 10); }
  function byChange(a, b, sign) {  // examples without a change (failed) go last
    var x = parseFloat(a.dataset.delta), y = parseFloat(b.dataset.delta);
    if (isNaN(x) !== isNaN(y)) return isNaN(x) ? 1 : -1;
    return (isNaN(x) ? 0 : sign * (x - y)) || idx(a) - idx(b);
  }
  function apply() {
    var s = state();
    items.forEach(function (el) { el.hidden = s.filter !== "all" && el.dataset.outcome !== s.filter; });
    var sorted = items.slice().sort(function (a, b) {
      if (s.sort === "best") return byChange(a, b, -1);
      if (s.sort === "worst") return byChange(a, b, 1);
      return idx(a) - idx(b);
    });
    sorted.forEach(function (el) { list.appendChild(el); });
    document.querySelectorAll("button[data-filter]").forEach(function (b) {
      b.setAttribute("aria-pressed", String(b.dataset.filter === s.filter));
    });
    document.getElementById("sort").value = s.sort;
    document.body.dataset.filter = s.filter;
    var shown = items.filter(function (el) { return !el.hidden; }).length;
    document.getElementById("shown").textContent = String(shown);
    document.getElementById("empty").hidden = shown > 0;
  }
  function go(key, value) {
    var p = new URLSearchParams(location.hash.replace(/^#/, ""));
    p.set(key, value);
    history.replaceState(null, "", "#" + p.toString());
    apply();
  }
  document.querySelectorAll("button[data-filter]").forEach(function (b) {
    b.addEventListener("click", function () { go("filter", b.dataset.filter); });
  });
  document.getElementById("sort").addEventListener("change", function (ev) { go("sort", ev.target.value); });
  window.addEventListener("hashchange", apply);
  apply();
})();
"""

_TEMPLATE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width,initial-scale=1">
<title>{title}</title><style>{css}</style></head>
<body data-filter="all">
<h1>{title}</h1>
<p class="headline">{headline}</p>
<p>Verdict: <span class="verdict {verdict_class}">{verdict}</span> <span class="muted">{verdict_text}</span></p>
<p>Guard: <span class="verdict {guard_class}">{guard_word}</span> <span class="muted">{guard}</span></p>
<p class="muted">{note}</p>
<details class="box" open><summary>Training curves</summary>{image}</details>
<details class="box"><summary>Run</summary>{run}</details>
<details class="box"><summary>Settings</summary>{settings}</details>
<h2>Held-out examples</h2>
<p class="muted">Base and trained model on each held-out example ({better}); change &gt; 0 means the trained
model did better.</p>
<div class="controls">{buttons}
<label>sort: <select id="sort"><option value="index">by index</option>
<option value="best">most improved first</option><option value="worst">most regressed first</option></select></label>
<span class="muted">showing <span id="shown"></span></span></div>
<section id="examples">
{examples}
</section>
<p id="empty" class="muted" hidden>No example in this group.</p>
<script>{js}</script>
</body></html>
"""
