"""Results folders written by the project's own writers (summary, rows, report.md/html), for the tests of what a
person reads after training (report.html, `posttrain runs`): SFT and RL runs with known per-example outcomes."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from posttrain.pipeline.results import (
    BASE_FILE,
    TRAINED_FILE,
    Outcome,
    ResultsDir,
    RLExample,
    RunFacts,
    SFTExample,
    build_summary,
    compare_examples,
    write_report,
    write_report_html,
    write_summary,
)
from posttrain.pipeline.settings import TrainConfig, config_to_dict

# Text a page must escape.
NASTY = 'a <b>bold</b> & "quoted" </pre><script>alert(1)</script>'

# SFT: index -> (base NLL, trained NLL); None: the evaluation failed on that side.
SFT_NLLS = {0: (2.0, 1.0), 1: (2.0, 1.5), 2: (2.0, 2.0), 3: (2.0, 3.0), 4: (1.0, 1.0), 5: (1.0, None)}
SFT_OUTCOMES = {0: "improved", 1: "improved", 2: "unchanged", 3: "regressed", 4: "unchanged", 5: "failed"}
# RL: index -> (base correct, trained correct); 3 is a multi-turn game with a transcript.
RL_CORRECT = {0: (False, True), 1: (True, False), 2: (True, True), 3: (False, False), 4: (True, False)}
RL_OUTCOMES = {0: "improved", 1: "regressed", 2: "unchanged", 3: "unchanged", 4: "regressed"}


def sft_rows(nlls: dict[int, tuple[float, float | None]] = SFT_NLLS) -> tuple[list, list]:
    base, trained = [], []
    for i, (b, t) in nlls.items():
        prompt, completion = f"prompt {i}: {NASTY}", f"completion {i} with x < y && z"
        base.append(SFTExample(i, prompt, completion, b))
        err = None if t is not None else "evaluation timed out <after 30 s>"
        trained.append(SFTExample(i, prompt, completion, t, error=err))
    return base, trained


def rl_rows() -> tuple[list, list]:
    base, trained = [], []
    for i, (b, t) in RL_CORRECT.items():
        for side, ok in ((base, b), (trained, t)):
            name = "base" if side is base else "trained"
            answer = f"{i}" if ok else f"{i + 1}"
            row = RLExample(i, f"question {i}: {NASTY}", str(i), f"{name} says <{answer}> & done", answer, ok)
            if i == 3:
                row.transcript = [
                    {"turn": 1, "player": f"{name}: Guess: 50", "env": "too <high>", "reward": 0.0},
                    {"turn": 2, "player": f"{name}: Guess: 25", "env": "too low & close", "reward": 0.0},
                ]
                row.details = {"outcome": "loss"}
            side.append(row)
    return base, trained


def write_run(
    folder: Path,
    run_name: str,
    kind: str = "nll",
    rows: tuple[list, list] | None = None,
    method: str | None = None,
    settings: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """A completed run's files in `folder`, as `finish.write_results` writes them; returns its summary."""
    base, trained = rows or (sft_rows() if kind == "nll" else rl_rows())
    comparison = compare_examples(base, trained, kind)  # type: ignore[arg-type]
    facts = RunFacts(
        method=method or ("sft" if kind == "nll" else "rl"),
        run_name=run_name,
        tinker_run_id=f"local-{run_name}",
        log_path=str(folder / "logs" / run_name),
        wandb_url=str(folder / "logs" / run_name / "wandb"),
        model="HuggingFaceTB/SmolLM2-135M-Instruct",
        backend="local",
        renderer="qwen3_instruct",
        renderer_source="explicit",
        hyperparameters={**config_to_dict(TrainConfig()), "run_name": run_name, **(settings or {})},
        durations={"base_eval": 1.5, "training": 60.0, "trained_eval": 1.5, "total": 75.0},
    )
    outcome = Outcome(
        kind=kind,  # type: ignore[arg-type]
        base_rows=[r.to_dict() for r in base],
        trained_rows=[r.to_dict() for r in trained],
        baseline=comparison["base_mean"],
        trained=comparison["trained_mean"],
        dataset={"source": "data/train.jsonl (local file)"},
        sizes={"train_rows": 40, "eval_rows": len(base)},
    )
    results = ResultsDir(folder)
    results.path.mkdir(parents=True, exist_ok=True)
    results.write_jsonl(BASE_FILE, base)
    results.write_jsonl(TRAINED_FILE, trained)
    summary = build_summary(facts, outcome, {"mode": "offline", "verified": True, "detail": "ok"}, comparison)
    summary.update(extra or {})
    write_summary(results, summary)
    write_report(results, summary, comparison, None)
    write_report_html(results, summary)
    return json.loads((folder / "summary.json").read_text())
