"""Per-example evaluation rows: their schema, validation and the metric each carries.

Rows (one per evaluated example, `index` = position in the evaluation set, the same for base and trained):

- RL  (`RLExample`):  {"index", "question", "ground_truth", "completion", "extracted_answer", "correct"}, and
  where they apply: "reward" (the score in [0, 1] when it is not just 0/1: the fraction of tests passed, a user
  verifier's value, a tic-tac-toe game's 1/0.5/0), "details" (e.g. tests_passed/tests_total; games: outcome
  win/draw/loss), "verifier_error" (the user verifier failed on this sample: file:line and error; the sample
  scored 0), "transcript" (multi-turn games: one entry per turn)
- SFT (`SFTExample`): {"index", "prompt", "completion", "nll"}, and with several distillation teachers
  "teacher" (whose completion it is); SFT runs add "answer" (the model's own greedy reply) to the first 64
- preference (`PreferenceExample`, DPO): {"index", "prompt", "chosen", "rejected", "chosen_logprob",
  "rejected_logprob", "margin", "correct"}: the length-normalised log-probs (mean per completion token) of the
  chosen and the rejected completion, margin = chosen - rejected, correct = margin > 0. Verifiable pairs (the
  data carries an answer) add "ground_truth", "completion" (the model's greedy answer to the prompt),
  "extracted_answer" and "task_correct" (graded with pipeline/grading.py).

Which schema rows follow is named by `validate_rows(..., schema=)` ("rl", "sft", "preference"); without one, the metric
kind decides ("score": rl, "nll": sft). Distillation rows use the SFT schema (NLL of the teacher's completion).

exactly those keys, plus an optional `"error"` (a string) present ONLY on an example whose evaluation failed;
on such a row `nll` / `correct` may be null (and `completion` / `extracted_answer` empty). Failed examples are
left out of the averages and of the improved/regressed counts, and counted separately.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

# "score": accuracy-like, higher is better (RL rows); "nll": lower is better (SFT rows).
MetricKind = Literal["score", "nll"]
RL_KEYS = ("index", "question", "ground_truth", "completion", "extracted_answer", "correct")
SFT_KEYS = ("index", "prompt", "completion", "nll")
PREFERENCE_KEYS = (
    "index",
    "prompt",
    "chosen",
    "rejected",
    "chosen_logprob",
    "rejected_logprob",
    "margin",
    "correct",
)
RL_OPTIONAL_KEYS = ("reward", "details", "verifier_error", "transcript")
SFT_OPTIONAL_KEYS = ("teacher", "answer")
PREFERENCE_OPTIONAL_KEYS = ("ground_truth", "completion", "extracted_answer", "task_correct")
OPTIONAL_KEYS: dict[str, tuple[str, ...]] = {
    "rl": RL_OPTIONAL_KEYS,
    "sft": SFT_OPTIONAL_KEYS,
    "preference": PREFERENCE_OPTIONAL_KEYS,
}
RowSchema = Literal["rl", "sft", "preference"]
ROW_KEYS: dict[str, tuple[str, ...]] = {"rl": RL_KEYS, "sft": SFT_KEYS, "preference": PREFERENCE_KEYS}
# The text fields of each schema (must be strings) and its per-example metric.
_TEXT_KEYS = {
    "rl": ("question", "ground_truth", "completion"),
    "sft": ("prompt", "completion"),
    "preference": ("prompt", "chosen", "rejected"),
}


def default_schema(kind: MetricKind) -> RowSchema:
    return "rl" if kind == "score" else "sft"


# ------------------------------------------------------------------------------------------------- rows


@dataclass
class RLExample:
    index: int
    question: str
    ground_truth: str
    completion: str
    extracted_answer: str | None
    correct: bool | None
    error: str | None = None
    reward: float | None = None
    details: dict[str, Any] | None = None
    verifier_error: str | None = None
    transcript: list[dict[str, Any]] | None = None

    def to_dict(self) -> dict[str, Any]:
        return _row_dict(self)


@dataclass
class SFTExample:
    index: int
    prompt: str
    completion: str
    nll: float | None
    error: str | None = None
    teacher: str | None = None  # distillation with several teachers: whose completion this is
    answer: str | None = None  # SFT: the model's own greedy reply to the prompt (the first held-out prompts)

    def to_dict(self) -> dict[str, Any]:
        return _row_dict(self)


@dataclass
class PreferenceExample:
    index: int
    prompt: str
    chosen: str
    rejected: str
    chosen_logprob: float | None
    rejected_logprob: float | None
    margin: float | None
    correct: bool | None
    error: str | None = None
    ground_truth: str | None = None
    completion: str | None = None
    extracted_answer: str | None = None
    task_correct: bool | None = None

    def to_dict(self) -> dict[str, Any]:
        return _row_dict(self)


def _row_dict(row: Any) -> dict[str, Any]:
    d = dataclasses.asdict(row)
    optional = (
        PREFERENCE_OPTIONAL_KEYS
        if isinstance(row, PreferenceExample)
        else SFT_OPTIONAL_KEYS
        if isinstance(row, SFTExample)
        else RL_OPTIONAL_KEYS
    )
    for key in ("error", *optional):  # optional keys appear only when they carry something
        if d.get(key) is None:
            d.pop(key, None)
    return d


def as_dict(row: Any) -> dict[str, Any]:
    if dataclasses.is_dataclass(row) and not isinstance(row, type):
        return _row_dict(row)
    if isinstance(row, Mapping):
        return dict(row)
    raise TypeError(f"a results row must be a dict or a dataclass, got {type(row).__name__}")


def summary_kind(summary: Mapping[str, Any]) -> MetricKind:
    """Which metric a summary carries: 'score' when it has baseline_score, else 'nll'."""
    return "score" if "baseline_score" in summary else "nll"


def validate_rows(rows: Iterable[Any], kind: MetricKind, schema: RowSchema | None = None) -> None:
    """Raise ValueError (naming the row and key) unless every row follows the JSONL schema (default: the
    kind's, see the module docstring)."""
    schema = schema or default_schema(kind)
    keys = ROW_KEYS[schema]
    seen: set[int] = set()
    for n, row in enumerate(rows):
        d = as_dict(row)
        extra = set(d) - set(keys) - {"error"} - set(OPTIONAL_KEYS.get(schema, ()))
        missing = [k for k in keys if k not in d]
        if missing or extra:
            raise ValueError(
                f"row {n}: keys must be exactly {', '.join(keys)} (+ optional error); "
                f"missing {missing or 'none'}, unexpected {sorted(extra) or 'none'}"
            )
        if not isinstance(d["index"], int) or isinstance(d["index"], bool) or d["index"] in seen:
            raise ValueError(f"row {n}: index must be a unique integer, got {d['index']!r}")
        seen.add(d["index"])
        failed = d.get("error") is not None
        if "error" in d and not isinstance(d["error"], str):
            raise ValueError(f"row {n}: error must be a string when present")
        for k in _TEXT_KEYS[schema]:
            if not isinstance(d[k], str):
                raise ValueError(f"row {n}: {k} must be a string, got {type(d[k]).__name__}")
        if schema in ("rl", "preference"):
            if not (isinstance(d["correct"], bool) or (failed and d["correct"] is None)):
                raise ValueError(f"row {n}: correct must be true/false (null only with an error)")
        if schema == "preference":
            if "task_correct" in d and not isinstance(d["task_correct"], bool):
                raise ValueError(f"row {n}: task_correct must be true/false when present")
            for k in ("chosen_logprob", "rejected_logprob", "margin"):
                if not (is_number(d[k]) or (failed and d[k] is None)):
                    raise ValueError(
                        f"row {n}: {k} must be a finite number (null only with an error), got {d[k]!r}"
                    )
        if schema == "sft":
            if "teacher" in d and not (isinstance(d["teacher"], str) and d["teacher"]):
                raise ValueError(f"row {n}: teacher must be a non-empty string when present")
            if "answer" in d and not isinstance(d["answer"], str):
                raise ValueError(f"row {n}: answer must be a string when present")
            nll = d["nll"]
            ok = is_number(nll) and nll >= 0
            if not (ok or (failed and nll is None)):
                raise ValueError(
                    f"row {n}: nll must be a finite number >= 0 (null only with an error), got {nll!r}"
                )


def mean_metric(rows: Iterable[Any], kind: MetricKind) -> float | None:
    """Mean accuracy (score) or mean NLL over the rows that did not fail; None if none did."""
    values = [v for v in (metric_value(as_dict(r), kind) for r in rows) if v is not None]
    return sum(values) / len(values) if values else None


def metric_value(d: dict[str, Any], kind: MetricKind) -> float | None:
    if d.get("error") is not None:
        return None
    if kind == "score":
        c = d.get("correct")
        return float(c) if isinstance(c, bool) else None
    v = d.get("nll")
    return float(v) if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) else None


def json_safe(obj: Any) -> Any:
    """Non-finite floats become null (strict JSON); dataclasses/paths become plain values."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, Mapping):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [json_safe(v) for v in obj]
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return json_safe(as_dict(obj))
    if isinstance(obj, Path):
        return str(obj)
    return obj


def is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
