"""`posttrain runs`: the runs of a results folder as a table, two runs compared, bad input in one line."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from result_folders import sft_rows, write_run

from posttrain.cli.main import main
from posttrain.pipeline.results import ResultsDir

# B against A, example by example: 0 better, 1 and 3 worse, 2 and 4 the same, 5 failed on A's side.
NLLS_B = {0: (2.0, 0.5), 1: (2.0, 1.8), 2: (2.0, 2.0), 3: (2.0, 3.5), 4: (1.0, 1.0), 5: (1.0, 1.2)}


@pytest.fixture
def results(tmp_path: Path) -> Path:
    """Three runs as training makes them: sft_a and sft_b moved to previous/ by the next run, rl_c current."""
    folder = tmp_path / "results"
    write_run(folder, "sft_a", settings={"learning_rate": 1e-4})
    ResultsDir(folder).prepare("sft_b")
    cost = {
        "tokens": {"estimate": {"train": 5000}, "trained_reported": 4321},
        "tinker_cost_estimate": {"usd": 0.125},
    }
    write_run(
        folder, "sft_b", rows=sft_rows(NLLS_B), settings={"learning_rate": 3e-4, "lora_rank": 8}, extra=cost
    )
    ResultsDir(folder).prepare("rl_c")
    write_run(folder, "rl_c", kind="score")
    now = 1_800_000_000
    os.utime(folder / "previous/sft_a/summary.json", (now - 100, now - 100))
    os.utime(folder / "previous/sft_b/summary.json", (now, now))
    return folder


def runs(capsys, *args: str) -> tuple[int, str, str]:
    code = main(["runs", *map(str, args)])
    out, err = capsys.readouterr()
    return code, out, err


def test_table_lists_every_run_newest_first(results: Path, capsys):
    code, out, err = runs(capsys, results)
    assert code == 0 and err == ""
    lines = [line for line in out.splitlines() if line.split()[:1] in (["rl_c"], ["sft_b"], ["sft_a"])]
    assert [line.split()[0] for line in lines] == ["rl_c", "sft_b", "sft_a"]
    rl, b, a = lines
    assert "previous/sft_b" in b and "previous/sft_a" in a
    assert "60.0% -> 40.0% accuracy" in rl and "not improved" in rl
    # 5 paired examples, 2 better, 1 worse: a 0.1-nat mean gain is within noise, and the row shows the interval.
    assert "1.800 -> 1.700 NLL" in a and "inconclusive [-" in a and "nats" in a
    assert "4,321" in b and "$0.12" in b  # tokens trained and the estimated bill where the run recorded them
    assert a.split()[-2:] == ["-", "-"]  # neither recorded: "-"
    for line in lines:
        assert "sft" in line or "rl" in line
        assert "SmolLM2-135M-Instruct" in line and "train.jsonl" in line and "1m15s" in line


def test_compare_two_runs_by_name_and_by_path(results: Path, capsys):
    code, out, err = runs(capsys, "sft_a", "sft_b", f"results_dir={results}")
    assert code == 0 and err == ""
    assert "A: sft_a" in out and "B: sft_b" in out
    settings = out[out.index("Settings that differ") : out.index("Per example")]
    rows = {line.split()[0]: line.split()[1:] for line in settings.splitlines()[3:] if line.strip()}
    assert rows["learning_rate"] == ["0.0001", "0.0003"]
    assert rows["lora_rank"][1] == "8" and "run_name" not in rows and "model" not in rows
    assert "6 paired by index): B better on 1, worse on 2, the same on 2, failed on either side 1" in out
    # 5 scored pairs, B better on 1 and worse on 2: no evidence either way, and the line says so with its interval.
    assert "B against A: " in out and "95% interval" in out and "n = 5): B is not better" in out
    gains, losses = out[out.index("Largest gains in B") :], out[out.index("Largest losses in B") :]
    assert gains.splitlines()[3].split()[0] == "0"  # example 0: 1.0 -> 0.5
    assert [line.split()[0] for line in losses.splitlines()[3:5]] == ["3", "1"]  # the largest loss first
    assert "-0.5" in losses.splitlines()[3]

    code, by_path, _ = runs(capsys, results / "previous/sft_a", results / "previous/sft_b")
    assert code == 0
    assert by_path.split("Settings")[1] == out.split("Settings")[1]


def test_compare_runs_of_different_kinds(results: Path, capsys):
    code, out, _ = runs(capsys, "rl_c", "sft_a", f"results_dir={results}")
    assert code == 0
    assert "note: no per-example comparison: one run measures NLL, the other a score" in out
    assert "method" in out.split("Settings that differ")[1]


@pytest.mark.parametrize(
    "make, args, fragment",
    [
        (lambda r: None, lambda r: ["nope", "sft_a", f"results_dir={r}"], "nope: no run of that name in"),
        (lambda r: (r / "empty").mkdir(), lambda r: [r / "empty"], "empty: no runs here"),
        (lambda r: None, lambda r: [r / "missing"], "missing: no such folder"),
        (
            lambda r: (r / "previous/sft_a/summary.json").write_text("{not json"),
            lambda r: [r],
            "previous/sft_a/summary.json: not valid JSON",
        ),
        (
            lambda r: (r / "previous/sft_a/summary.json").write_text("[1, 2]"),
            lambda r: ["sft_a", "sft_b", f"results_dir={r}"],
            "previous/sft_a/summary.json: not a JSON object",
        ),
        (lambda r: None, lambda r: ["a", "b", "c"], "expected a results folder or two runs, got 3 arguments"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(results: Path, capsys, make, args, fragment):
    make(results)
    code, out, err = runs(capsys, *args(results))
    assert code == 2 and out == ""
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err
    assert fragment in err
    if "summary.json" in fragment or "empty" in fragment or "missing" in fragment:
        assert str(results) in err  # names the path
