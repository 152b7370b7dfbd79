"""The measured numbers the documentation quotes are the ones their result files hold: every result a row of
BENCHMARKS.md or of docs/measured-runs.md cites (`benchmarks/results/X.json`, `--name X`, `` `X` ``)
exists, and where a row quotes a run's NLL (base -> trained, reduction) it is that run's own headline."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from runs import REPO

RESULTS = REPO / "benchmarks" / "results"
PLACEHOLDER = "NAME"  # `--name NAME`, benchmarks/results/NAME.json: how to name a run, not a run
# What a benchmark's result is named (its --name): a kind, then the run's own words.
RESULT_NAME = re.compile(
    r"(?:memory|mem|sft|sampling|threads|fail_fast|engine_start|train_shapes)(?:_[A-Za-z0-9]+)*"
)
# "Base NLL: 2.41 → Trained NLL: 1.35 (44.0% reduction)", "2.41 -> 1.35 (44.0%)", "2.41 -> 1.35".
QUOTED_NLL = re.compile(
    r"(\d\.\d\d) (?:→|->) (?:Trained NLL: )?(\d\.\d\d)(?: \((\d+\.\d)%(?: reduction)?\))?"
)
# The run's own headline, as its terminal printed it (bench_memory keeps the lines in `progress_lines`).
HEADLINE = re.compile(r"Base NLL: (\d\.\d\d) → Trained NLL: (\d\.\d\d) \((\d+\.\d)% reduction\)")


def _measured_runs() -> str:
    """docs/measured-runs.md, the "Measured runs" page (the README's section until issue 37 moved it)."""
    return (REPO / "docs" / "measured-runs.md").read_text(encoding="utf-8")


def _documents() -> dict[str, str]:
    return {
        "BENCHMARKS.md": (REPO / "BENCHMARKS.md").read_text(encoding="utf-8"),
        "docs/measured-runs.md": _measured_runs(),
    }


def _cited(line: str) -> list[str]:
    """The result files a line cites, as paths under benchmarks/results/, in order."""
    found = re.findall(r"benchmarks/results/([A-Za-z0-9_.-]+)", line)
    names = re.findall(r"--name ([A-Za-z0-9_]+)", line)
    names += [t for t in re.findall(r"`([^`\s]+)`", line) if RESULT_NAME.fullmatch(t)]
    found += [f"{n}.json" for n in names]
    return list(dict.fromkeys(f for f in found if Path(f).stem != PLACEHOLDER))


def _rows() -> list[tuple[str, int, str]]:
    """Every table row of the documents: (document, line number in it, the row)."""
    return [
        (doc, n, line)
        for doc, text in _documents().items()
        for n, line in enumerate(text.splitlines(), 1)
        if line.startswith("|")
    ]


def _headline(result: Path) -> tuple[str, str, str] | None:
    """(base, trained, reduction) of the run's last headline, or None for a result without one."""
    if result.suffix != ".json":
        return None
    lines = [p.get("line", "") for p in json.loads(result.read_text()).get("progress_lines", [])]
    found = [m.groups() for m in map(HEADLINE.search, lines) if m]
    return found[-1] if found else None


def test_every_cited_result_file_exists():
    missing = [
        (doc, n, name)
        for doc, text in _documents().items()
        for n, line in enumerate(text.splitlines(), 1)
        for name in _cited(line)
        if not (RESULTS / name).is_file()
    ]
    assert missing == []
    # The check sees the citations it is meant to: measured-runs.md's rows name their bench_memory runs.
    assert {"memory_s5_final.json", "memory_s7_w192.json"} <= {c for _, _, r in _rows() for c in _cited(r)}


def test_a_rows_quoted_nll_is_its_result_files():
    checked, wrong = 0, []
    for doc, n, row in _rows():
        cited = [RESULTS / c for c in _cited(row) if (RESULTS / c).is_file()]
        quoted = QUOTED_NLL.search(row)
        if len(cited) != 1 or quoted is None or (held := _headline(cited[0])) is None:
            continue  # a row of several runs, or without an NLL, is read by a person
        base, trained, reduction = quoted.groups()
        checked += 1
        # The row's first quote is its run's; a reduction, where the row gives one, must match too.
        if (base, trained) != held[:2] or reduction not in (None, held[2]):
            wrong.append(f"{doc} row {n} quotes {quoted.group(0)!r}; {cited[0].name} holds {held}")
    assert wrong == []
    assert checked >= 20  # BENCHMARKS.md's memory tables and measured-runs.md's rows, not a vacuous pass


@pytest.mark.parametrize("doc", ["docs/measured-runs.md", "BENCHMARKS.md"])
def test_memory_s5_final_is_quoted_as_it_finished(doc: str):
    """The run's own result: 'Base NLL: 2.41 → Trained NLL: 1.35 (44.0% reduction)' (not 1.34 / 44.2%)."""
    assert _headline(RESULTS / "memory_s5_final.json") == ("2.41", "1.35", "44.0")
    rows = [r for d, _, r in _rows() if d == doc and _cited(r)[:1] == ["memory_s5_final.json"]]
    assert len(rows) == 1, rows
    quoted = QUOTED_NLL.search(rows[0])
    assert quoted is not None and quoted.groups() == ("2.41", "1.35", "44.0"), rows[0]
