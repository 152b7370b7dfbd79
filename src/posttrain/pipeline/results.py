"""The results/ folder: per-example JSONL rows, summary.json, report.md and training_curves.png.

Rows (one per evaluated example, `index` = position in the evaluation set, the same for base and trained):

- RL  (`RLExample`):  {"index", "question", "ground_truth", "completion", "extracted_answer", "correct"}
- SFT (`SFTExample`): {"index", "prompt", "completion", "nll"}

exactly those keys, plus an optional `"error"` (a string) present ONLY on an example whose evaluation failed;
on such a row `nll` / `correct` may be null (and `completion` / `extracted_answer` empty). Failed examples are
left out of the averages and of the improved/regressed counts, and counted separately.

Files are written atomically (temp file in the same directory + os.replace) and pass through `redact()` first.
`ResultsDir.prepare()` moves a previous run's files to `previous/<its run_name or timestamp>/`; nothing is ever
deleted or silently overwritten.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as _dt
import json
import math
import os
import platform
import shutil
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from posttrain.pipeline.preflight import redact

TASK_TYPES = ("rl", "sft", "dpo", "distillation")
VERDICTS = ("improved", "not improved")
RL_KEYS = ("index", "question", "ground_truth", "completion", "extracted_answer", "correct")
SFT_KEYS = ("index", "prompt", "completion", "nll")
# Per-example NLL counts as changed when it moves by more than this fraction of the base NLL.
NLL_RELATIVE_TOLERANCE = 1e-3
# The run counts as improved when the mean NLL drops by more than this fraction (RL: any accuracy gain).
IMPROVEMENT_NLL_RELATIVE = 1e-3

BASE_FILE = "base_model.jsonl"
TRAINED_FILE = "trained_model.jsonl"
SUMMARY_FILE = "summary.json"
REPORT_FILE = "report.md"
PLOT_FILE = "training_curves.png"


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

    def to_dict(self) -> dict[str, Any]:
        return _row_dict(self)


@dataclass
class SFTExample:
    index: int
    prompt: str
    completion: str
    nll: float | None
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return _row_dict(self)


def _row_dict(row: Any) -> dict[str, Any]:
    d = dataclasses.asdict(row)
    if d.get("error") is None:
        d.pop("error", None)
    return d


def _as_dict(row: Any) -> dict[str, Any]:
    if dataclasses.is_dataclass(row) and not isinstance(row, type):
        return _row_dict(row)
    if isinstance(row, Mapping):
        return dict(row)
    raise TypeError(f"a results row must be a dict or a dataclass, got {type(row).__name__}")


def metric_kind(task_type: str) -> str:
    """'score' (accuracy, higher is better) for RL, 'nll' (lower is better) for the supervised kinds."""
    return "score" if task_type == "rl" else "nll"


def validate_rows(rows: Iterable[Any], task_type: str) -> None:
    """Raise ValueError (naming the row and key) unless every row follows the JSONL schema for `task_type`."""
    keys = RL_KEYS if metric_kind(task_type) == "score" else SFT_KEYS
    seen: set[int] = set()
    for n, row in enumerate(rows):
        d = _as_dict(row)
        extra = set(d) - set(keys) - {"error"}
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
        if keys is RL_KEYS:
            for k in ("question", "ground_truth", "completion"):
                if not isinstance(d[k], str):
                    raise ValueError(f"row {n}: {k} must be a string, got {type(d[k]).__name__}")
            if not (isinstance(d["correct"], bool) or (failed and d["correct"] is None)):
                raise ValueError(f"row {n}: correct must be true/false (null only with an error)")
        else:
            for k in ("prompt", "completion"):
                if not isinstance(d[k], str):
                    raise ValueError(f"row {n}: {k} must be a string, got {type(d[k]).__name__}")
            nll = d["nll"]
            ok = (
                isinstance(nll, int | float) and not isinstance(nll, bool) and math.isfinite(nll) and nll >= 0
            )
            if not (ok or (failed and nll is None)):
                raise ValueError(
                    f"row {n}: nll must be a finite number >= 0 (null only with an error), got {nll!r}"
                )


def mean_metric(rows: Iterable[Any], task_type: str) -> float | None:
    """Mean accuracy (RL) or mean NLL (SFT) over the rows that did not fail; None if none did."""
    values = []
    for row in rows:
        d = _as_dict(row)
        v = _metric_value(d, task_type)
        if v is not None:
            values.append(v)
    return sum(values) / len(values) if values else None


def _metric_value(d: dict[str, Any], task_type: str) -> float | None:
    if d.get("error") is not None:
        return None
    if metric_kind(task_type) == "score":
        c = d.get("correct")
        return float(c) if isinstance(c, bool) else None
    v = d.get("nll")
    return float(v) if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) else None


# ------------------------------------------------------------------------------------------ results dir


def _json_safe(obj: Any) -> Any:
    """Non-finite floats become null (strict JSON); dataclasses/paths become plain values."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, Mapping):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_json_safe(v) for v in obj]
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return _json_safe(_as_dict(obj))
    if isinstance(obj, Path):
        return str(obj)
    return obj


_FILE_MODE = 0o644  # mkstemp creates 0600; results are meant to be read by others


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write `text` to `path` through a temp file in the same directory and os.replace (never half-written)."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, _FILE_MODE)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return path


# Top-level files that belong to a run (moved aside together by `prepare`).
_ARTIFACT_GLOBS = ("*.json", "*.jsonl", "*.md", "*.png")


class ResultsDir:
    """The results folder of one run (`results/` by default)."""

    def __init__(self, path: str | Path = "results"):
        self.path = Path(path)

    def _artifacts(self) -> list[Path]:
        if not self.path.is_dir():
            return []
        found = {
            p
            for g in _ARTIFACT_GLOBS
            for p in self.path.glob(g)
            if p.is_file() and not p.name.startswith(".")
        }
        return sorted(found)

    def _previous_name(self) -> str:
        summary = self.path / SUMMARY_FILE
        name = None
        if summary.is_file():
            try:
                name = json.loads(summary.read_text(encoding="utf-8")).get("run_name")
            except (ValueError, OSError, AttributeError):
                name = None
        if not isinstance(name, str) or not name.strip() or "/" in name or name in (".", ".."):
            newest = max((p.stat().st_mtime for p in self._artifacts()), default=None)
            stamp = _dt.datetime.fromtimestamp(newest) if newest else _dt.datetime.now()
            name = "run-" + stamp.strftime("%Y%m%d-%H%M%S")
        base = self.path / "previous" / name
        dest, n = base, 2
        while dest.exists():
            dest = base.with_name(f"{base.name}-{n}")
            n += 1
        return dest.name

    def prepare(self, run_name: str | None = None) -> Path | None:
        """Create the folder; move a previous run's files (and an old `logs/<run_name>`) to previous/<name>/.

        The previous run is named by the run_name in its summary.json, else by its files' timestamp; an
        existing previous/<name> is never overwritten (-2, -3, ... are appended). Prints what was moved and
        returns the destination, or None when there was nothing to move.
        """
        self.path.mkdir(parents=True, exist_ok=True)
        files = self._artifacts()
        old_logs = self.log_dir(run_name) if run_name else None
        if old_logs is not None and not (old_logs.is_dir() and any(old_logs.iterdir())):
            old_logs = None
        if not files and old_logs is None:
            return None
        dest = self.path / "previous" / self._previous_name()
        dest.mkdir(parents=True)
        moved = []
        for f in files:
            shutil.move(str(f), str(dest / f.name))
            moved.append(f.name)
        if old_logs is not None:
            (dest / "logs").mkdir()
            shutil.move(str(old_logs), str(dest / "logs" / old_logs.name))
            moved.append(f"logs/{old_logs.name}")
        print(f"Moved the previous run's results ({', '.join(moved)}) to {dest}")
        return dest

    def log_dir(self, run_name: str) -> Path:
        """results_dir/logs/run_name (the cookbook's log_path)."""
        return self.path / "logs" / run_name

    def write_text(self, name: str, text: str) -> Path:
        return atomic_write_text(self.path / name, redact(text))

    def write_json(self, name: str, obj: Any) -> Path:
        text = json.dumps(_json_safe(obj), indent=2, ensure_ascii=False, allow_nan=False)
        return self.write_text(name, text + "\n")

    def write_jsonl(self, name: str, rows: Iterable[Any]) -> Path:
        lines = [json.dumps(_json_safe(_as_dict(r)), ensure_ascii=False, allow_nan=False) for r in rows]
        return self.write_text(name, "".join(line + "\n" for line in lines))


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


# --------------------------------------------------------------------------------------------- summary


def collect_versions() -> dict[str, str | None]:
    """Versions of posttrain, tinker, tinker_cookbook, torch and python (without importing torch)."""
    from posttrain import __version__

    def v(dist: str) -> str | None:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            return None

    return {
        "posttrain": __version__,
        "tinker": v("tinker"),
        "tinker_cookbook": v("tinker-cookbook"),
        "torch": v("torch"),
        "wandb": v("wandb"),
        "python": platform.python_version(),
    }


def compute_improvement(task_type: str, baseline: float, trained: float) -> dict[str, Any]:
    """How much better the trained model is: positive `absolute` = better, whatever the metric direction.

    NLL: absolute = baseline - trained (the reduction), relative = absolute / baseline.
    Score: absolute = trained - baseline, points = 100 * absolute, relative = absolute / baseline (None if 0).
    """
    if metric_kind(task_type) == "nll":
        absolute = baseline - trained
        relative = absolute / baseline if baseline > 0 else None
        improved = relative is not None and relative > IMPROVEMENT_NLL_RELATIVE
        pct = abs(relative) * 100 if relative is not None else None
        text = f"{pct:.1f}% {'reduction' if absolute >= 0 else 'increase'}" if pct is not None else "n/a"
        return {
            "metric": "nll",
            "higher_is_better": False,
            "absolute": absolute,
            "relative": relative,
            "description": text,
            "improved": improved,
        }
    absolute = trained - baseline
    relative = absolute / baseline if baseline > 0 else None
    return {
        "metric": "accuracy",
        "higher_is_better": True,
        "absolute": absolute,
        "points": absolute * 100,
        "relative": relative,
        "description": f"{absolute * 100:+.1f} points",
        "improved": absolute > 1e-12,
    }


def headline(summary: Mapping[str, Any]) -> str:
    """'Base NLL: 2.80 → Trained NLL: 1.90 (32.1% reduction)' / 'Base accuracy: 42.0% → Trained: 67.0% (+25.0 points)'."""
    task = summary["task_type"]
    if metric_kind(task) == "score" or ("baseline_score" in summary and "baseline_nll" not in summary):
        b, t = summary["baseline_score"], summary["trained_score"]
        return f"Base accuracy: {b * 100:.1f}% → Trained: {t * 100:.1f}% ({(t - b) * 100:+.1f} points)"
    b, t = summary["baseline_nll"], summary["trained_nll"]
    imp = compute_improvement(task, b, t)
    return f"Base NLL: {b:.2f} → Trained NLL: {t:.2f} ({imp['description']})"


def build_summary(
    *,
    task_type: str,
    run_name: str,
    tinker_run_id: str,
    log_path: str | Path,
    wandb_url: str,
    baseline: float,
    trained: float,
    model: str,
    backend: str,
    renderer: str,
    renderer_source: str,
    dataset: Mapping[str, Any],
    sizes: Mapping[str, int],
    hyperparameters: Mapping[str, Any],
    durations: Mapping[str, float],
    wandb_verification: Mapping[str, Any] | None,
    comparison: Mapping[str, Any] | None = None,
    checkpoint_path: str | None = None,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The summary.json content. `baseline`/`trained` are accuracies in [0, 1] (RL) or mean NLLs (others).

    `wandb_url` is the run URL online; offline it is the local offline-run directory (`wandb sync` it).
    `hyperparameters` is `config_to_dict(cfg)` (every setting); `durations` are seconds per phase.
    """
    if task_type not in TASK_TYPES:
        raise ValueError(f"task_type must be one of {', '.join(TASK_TYPES)}, got {task_type!r}")
    improvement = compute_improvement(task_type, baseline, trained)
    summary: dict[str, Any] = {
        "task_type": task_type,
        "run_name": run_name,
        "tinker_run_id": tinker_run_id,
        "log_path": str(log_path),
        "wandb_url": wandb_url,
    }
    if metric_kind(task_type) == "score":
        summary.update(baseline_score=baseline, trained_score=trained)
    else:
        summary.update(baseline_nll=baseline, trained_nll=trained)
    summary.update(
        headline="",
        improvement=improvement,
        verdict="improved" if improvement["improved"] else "not improved",
        model=model,
        backend=backend,
        renderer={"name": renderer, "source": renderer_source},
        dataset=dict(dataset),
        sizes=dict(sizes),
        hyperparameters=dict(hyperparameters),
        durations_seconds=dict(durations),
        versions=collect_versions(),
        wandb_verification=dict(wandb_verification) if wandb_verification is not None else None,
        checkpoint_path=checkpoint_path,
        created_at=_dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
    )
    summary["headline"] = headline(summary)
    if comparison is not None:
        summary["per_example"] = {
            k: comparison[k]
            for k in ("paired", "improved", "regressed", "unchanged", "errors")
            if k in comparison
        }
    if extra:
        summary.update(extra)
    return summary


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def validate_summary(d: Mapping[str, Any]) -> None:
    """Raise ValueError listing every problem unless `d` has the spec's fields with the right types."""
    problems: list[str] = []
    if not isinstance(d, Mapping):
        raise ValueError("summary must be a JSON object")
    task = d.get("task_type")
    if task not in TASK_TYPES:
        problems.append(f"task_type must be one of {', '.join(TASK_TYPES)} (got {task!r})")
    for key in ("tinker_run_id", "log_path", "model", "backend"):
        if not isinstance(d.get(key), str) or not d.get(key, "").strip():
            problems.append(f"{key} must be a non-empty string (got {d.get(key)!r})")
    # wandb_url: the run URL (online) or the offline run directory; empty only when the W&B check failed and
    # wandb_verification says why.
    url, wv = d.get("wandb_url"), d.get("wandb_verification")
    failed_check = isinstance(wv, Mapping) and wv.get("verified") is False and bool(wv.get("detail"))
    if not isinstance(url, str) or (not url.strip() and not failed_check):
        problems.append(f"wandb_url must be a non-empty string (got {url!r})")
    pairs = {"score": ("baseline_score", "trained_score"), "nll": ("baseline_nll", "trained_nll")}
    if task == "rl":
        wanted = ["score"]
    elif task == "sft":
        wanted = ["nll"]
    else:  # dpo / distillation: whichever pair the run measured
        wanted = ["score"] if "baseline_score" in d and "baseline_nll" not in d else ["nll"]
    for kind in wanted:
        for key in pairs[kind]:
            v = d.get(key)
            if not _is_number(v):
                problems.append(f"{key} must be a finite number (got {v!r})")
            elif kind == "score" and not 0 <= v <= 1:
                problems.append(f"{key} must be an accuracy in [0, 1] (got {v!r})")
            elif kind == "nll" and v < 0:
                problems.append(f"{key} must be >= 0 (got {v!r})")
    if d.get("verdict") not in VERDICTS:
        problems.append(f"verdict must be one of {', '.join(VERDICTS)} (got {d.get('verdict')!r})")
    imp = d.get("improvement")
    if not isinstance(imp, Mapping) or not _is_number(imp.get("absolute")):
        problems.append("improvement must be an object with a numeric 'absolute'")
    if not isinstance(d.get("hyperparameters"), Mapping):
        problems.append("hyperparameters must be an object (every setting)")
    if not isinstance(d.get("versions"), Mapping):
        problems.append("versions must be an object")
    wv = d.get("wandb_verification")
    if wv is not None and (not isinstance(wv, Mapping) or not isinstance(wv.get("verified"), bool)):
        problems.append("wandb_verification must be null or an object with a boolean 'verified'")
    if problems:
        raise ValueError("invalid summary: " + "; ".join(problems))


def write_summary(results: ResultsDir, summary: Mapping[str, Any]) -> Path:
    """Validate and write summary.json."""
    validate_summary(summary)
    return results.write_json(SUMMARY_FILE, summary)


# ------------------------------------------------------------------------------------------ comparison


def _snippet(text: Any, n: int = 120) -> str:
    s = " ".join(str(text or "").split())
    return s if len(s) <= n else s[: n - 1] + "…"


def compare_examples(
    base_rows: Iterable[Any], trained_rows: Iterable[Any], task_type: str, top: int = 5
) -> dict:
    """Pair base and trained rows by `index` and count improved / regressed / unchanged examples.

    SFT: improved when the trained NLL is lower by more than NLL_RELATIVE_TOLERANCE of the base NLL (regressed:
    higher by more than that). RL: improved when correct flipped false→true, regressed true→false. Rows with an
    error (or a null metric) on either side are counted in `errors`, not in the three buckets. `base_mean` /
    `trained_mean` average only the examples both models were evaluated on without error: use them as the
    summary's baseline/trained numbers so both sides cover the same examples.
    """
    kind = metric_kind(task_type)
    base = {d["index"]: d for d in map(_as_dict, base_rows)}
    trained = {d["index"]: d for d in map(_as_dict, trained_rows)}
    paired_idx = sorted(set(base) & set(trained))
    improved, regressed, unchanged, errors = [], [], [], []
    for i in paired_idx:
        b, t = base[i], trained[i]
        bv, tv = _metric_value(b, task_type), _metric_value(t, task_type)
        if bv is None or tv is None:
            errors.append(i)
            continue
        if kind == "nll":
            delta = bv - tv  # > 0: better
            tol = NLL_RELATIVE_TOLERANCE * max(abs(bv), 1e-8)
            entry = {
                "index": i,
                "prompt": _snippet(b.get("prompt")),
                "base": bv,
                "trained": tv,
                "delta": delta,
            }
            (improved if delta > tol else regressed if delta < -tol else unchanged).append(entry)
        else:
            entry = {
                "index": i,
                "question": _snippet(b.get("question")),
                "ground_truth": _snippet(b.get("ground_truth"), 60),
                "base_answer": _snippet(b.get("extracted_answer"), 60),
                "trained_answer": _snippet(t.get("extracted_answer"), 60),
                "base": bool(bv),
                "trained": bool(tv),
                "delta": tv - bv,
            }
            (improved if tv > bv else regressed if tv < bv else unchanged).append(entry)
    valid = [i for i in paired_idx if i not in set(errors)]
    base_mean = sum(_metric_value(base[i], task_type) for i in valid) / len(valid) if valid else None
    trained_mean = sum(_metric_value(trained[i], task_type) for i in valid) / len(valid) if valid else None
    improved.sort(key=lambda e: -e["delta"])
    regressed.sort(key=lambda e: e["delta"])
    return {
        "task_type": task_type,
        "paired": len(paired_idx),
        "improved": len(improved),
        "regressed": len(regressed),
        "unchanged": len(unchanged),
        "errors": len(errors),
        "error_indices": errors,
        # Means over the examples evaluated successfully on both sides (a like-for-like comparison).
        "base_mean": base_mean,
        "trained_mean": trained_mean,
        "unpaired_base": sorted(set(base) - set(trained)),
        "unpaired_trained": sorted(set(trained) - set(base)),
        "top_improved": improved[:top],
        "top_regressed": regressed[:top],
    }


# ---------------------------------------------------------------------------------------------- report


def _not_improved_warning(summary: Mapping[str, Any]) -> str:
    rl = metric_kind(summary["task_type"]) == "score"
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


def _fmt(v: Any) -> str:
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
            if _is_number(v):
                x = row.get("step", n)
                pts.append((float(x) if _is_number(x) else float(n), float(v)))
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
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train, evals = _series(metrics_rows)
    panels = (1 if train else 0) + (1 if evals else 0) + 1
    fig, axes = plt.subplots(1, panels, figsize=(5.2 * panels, 4), squeeze=False)
    ax_iter = iter(axes[0])
    if train:
        ax = next(ax_iter)
        for k, pts in train.items():
            ax.plot([p[0] for p in pts], [p[1] for p in pts], label=k, marker="." if len(pts) < 30 else None)
        ax.set_title("Training")
        ax.set_xlabel("step")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    if evals:
        ax = next(ax_iter)
        for k, pts in evals.items():
            ax.plot([p[0] for p in pts], [p[1] for p in pts], label=k, marker="o")
        ax.set_title("Evaluation during training")
        ax.set_xlabel("step")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    ax = next(ax_iter)
    if metric_kind(summary["task_type"]) == "score" or "baseline_score" in summary:
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
    fig.suptitle(headline(summary), fontsize=10)
    fig.tight_layout()
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".png", dir=path.parent)
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=110)
        os.chmod(tmp, _FILE_MODE)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    finally:
        plt.close(fig)
    return path


_SETTINGS_SHOWN = (
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
    rl = metric_kind(summary["task_type"]) == "score" or "baseline_score" in summary
    imp = summary.get("improvement") or compute_improvement(
        summary["task_type"],
        summary["baseline_score" if rl else "baseline_nll"],
        summary["trained_score" if rl else "trained_nll"],
    )

    lines = [
        f"# Post-training report: {_md(summary.get('run_name', ''))}",
        "",
        f"**{headline(summary)}**",
        "",
    ]
    if warning:
        lines += ["> " + line for line in warning.splitlines()] + [""]
    else:
        lines += ["Verdict: **improved**", ""]
    rel = imp.get("relative")
    lines += [
        "## Result",
        "",
        "| | Base | Trained | Change |",
        "|---|---|---|---|",
    ]
    if rl:
        b, t = summary["baseline_score"], summary["trained_score"]
        rel_text = f"{rel * 100:+.1f}% relative" if rel is not None else "n/a relative"
        lines.append(
            f"| Accuracy | {b * 100:.1f}% | {t * 100:.1f}% | {(t - b) * 100:+.1f} points ({rel_text}) |"
        )
    else:
        b, t = summary["baseline_nll"], summary["trained_nll"]
        rel_text = imp.get("description", "")
        lines.append(f"| Mean NLL | {b:.4f} | {t:.4f} | {t - b:+.4f} ({rel_text}) |")
    lines += [
        "",
        "## Per example",
        "",
        f"Paired examples: {comparison.get('paired', 0)} — improved **{comparison.get('improved', 0)}**, "
        f"regressed **{comparison.get('regressed', 0)}**, unchanged {comparison.get('unchanged', 0)}"
        + (f", failed evaluation {comparison['errors']}" if comparison.get("errors") else ""),
        "",
    ]
    for title, key in (("Most improved", "top_improved"), ("Most regressed", "top_regressed")):
        entries = comparison.get(key) or []
        if not entries:
            continue
        lines += [f"### {title}", ""]
        if rl:
            lines += [
                "| index | question | ground truth | base answer | trained answer |",
                "|---|---|---|---|---|",
            ]
            for e in entries:
                lines.append(
                    f"| {e['index']} | {_md(e.get('question', ''))} | {_md(e.get('ground_truth', ''))} | "
                    f"{_md(e.get('base_answer', ''))} | {_md(e.get('trained_answer', ''))} |"
                )
        else:
            lines += ["| index | prompt | base NLL | trained NLL | change |", "|---|---|---|---|---|"]
            for e in entries:
                lines.append(
                    f"| {e['index']} | {_md(e.get('prompt', ''))} | {e['base']:.3f} | {e['trained']:.3f} | "
                    f"{-e['delta']:+.3f} |"
                )
        lines.append("")

    lines += ["## Run", "", "| | |", "|---|---|"]
    renderer = summary.get("renderer") or {}
    run_facts = [
        ("task type", summary.get("task_type")),
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
    for k, v in (summary.get("sizes") or {}).items():
        run_facts.append((k, v))
    for k, v in (summary.get("durations_seconds") or {}).items():
        run_facts.append((f"{k} (s)", f"{v:.1f}" if _is_number(v) else v))
    for k, v in run_facts:
        if v is not None:
            lines.append(f"| {_md(k)} | {_md(v)} |")
    hp = summary.get("hyperparameters") or {}
    if hp:
        lines += ["", "## Settings", "", "| setting | value |", "|---|---|"]
        shown = [k for k in _SETTINGS_SHOWN if k in hp] + [k for k in hp if k not in _SETTINGS_SHOWN]
        for k in shown:
            lines.append(f"| {_md(k)} | {_md(_fmt(hp[k]))} |")

    metrics_rows = load_metrics(metrics_path)
    plot_training_curves(results.path / PLOT_FILE, summary, metrics_rows)
    lines += ["", "## Curves", "", f"![training curves]({PLOT_FILE})", ""]
    if not metrics_rows:
        lines.append(
            f"(no metrics.jsonl found{f' at {metrics_path}' if metrics_path else ''}: only the held-out scores are plotted)"
        )
    results.write_text(REPORT_FILE, "\n".join(lines) + "\n")
    return warning
