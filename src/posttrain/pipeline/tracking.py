"""W&B tracking: which mode, where the run files land, and checking that metrics really arrived.

Where the files are
-------------------
The cookbook loops log to W&B themselves when given `wandb_project`: `tinker_cookbook.utils.ml_log.setup_logging`
builds a `WandbLogger`, which calls `wandb.init(project=..., config=..., dir=<log_path>, name=<wandb_name>)`.
wandb honours `WANDB_MODE` from the environment, so running offline needs only `WANDB_MODE=offline` (see
`wandb_environment`). Because `dir=<log_path>` is passed explicitly, the run files land in the log directory
whatever WANDB_DIR says:

    <log_path>/wandb/offline-run-<YYYYmmdd_HHMMSS>-<run id>/run-<run id>.wandb    (offline)
    <log_path>/wandb/run-<YYYYmmdd_HHMMSS>-<run id>/run-<run id>.wandb            (online)

and `wandb sync <log_path>/wandb/offline-run-...` uploads an offline run later.

How an offline run is read
--------------------------
wandb 0.31 has no Python reader for `.wandb` transaction logs any more (the old `wandb.sdk.internal.datastore`
is gone); its reader lives in the bundled `wandb-core` binary, exposed as `wandb leet inspect --json` (one JSON
object per record). `read_wandb_records` runs that binary directly (`wandb-core leet inspect --no-observability
--json --run-file <file> <wandb dir>`: local only, no telemetry). Without that binary an offline run cannot be
verified, and the verification says so (it is part of every wandb wheel).

Final metrics (`log_final_metrics`)
-----------------------------------
The cookbook finishes its W&B run when training ends. The baseline-vs-trained evaluation is logged to a separate
small run, `<run_name>-eval` with `job_type="eval"`, in the same project and the same group (`group=run_name`;
`wandb_environment(group=run_name)` puts the training run in that group too via WANDB_RUN_GROUP). That works the
same online and offline; resuming the finished training run by id does not: offline, a resumed run is a second
offline directory with the same id that `wandb sync` has to merge.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from posttrain.util import redact

_OFF_MODES = ("offline", "disabled", "dryrun")
# The project when neither wandb_project= nor WANDB_PROJECT says one.
DEFAULT_WANDB_PROJECT = "posttrain"


def resolve_project(explicit: str | None) -> str:
    """wandb_project= if given, else WANDB_PROJECT from the environment (.env), else DEFAULT_WANDB_PROJECT."""
    return explicit or os.environ.get("WANDB_PROJECT", "").strip() or DEFAULT_WANDB_PROJECT


def wandb_mode() -> str:
    """'online' when WANDB_API_KEY is set and WANDB_MODE is not offline/disabled, else 'offline'."""
    if (
        os.environ.get("WANDB_API_KEY", "").strip()
        and os.environ.get("WANDB_MODE", "").lower() not in _OFF_MODES
    ):
        return "online"
    return "offline"


@contextlib.contextmanager
def wandb_environment(mode: str, group: str | None = None) -> Iterator[None]:
    """Set WANDB_MODE (and WANDB_RUN_GROUP) for the cookbook's own `wandb.init`; restore the previous values after.

    Offline, wandb's error reporting is switched off too (WANDB_ERROR_REPORTING=false) unless already set, so an
    offline run makes no network calls.
    """
    if mode not in ("online", "offline"):
        raise ValueError(f"mode must be 'online' or 'offline', got {mode!r}")
    changes: dict[str, str] = {"WANDB_MODE": mode}
    if group:
        changes["WANDB_RUN_GROUP"] = group
    if mode == "offline" and "WANDB_ERROR_REPORTING" not in os.environ:
        changes["WANDB_ERROR_REPORTING"] = "false"
    previous = {key: os.environ.get(key) for key in changes}
    os.environ.update(changes)
    try:
        yield
    finally:
        for key, value in previous.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


# --------------------------------------------------------------------------------------- local run files


def find_wandb_run_files(path: str | Path) -> list[Path]:
    """The `.wandb` files under `path`, newest first.

    `path` may be a `.wandb` file, a run directory (`.../offline-run-*/`), a wandb directory (`.../wandb/`) or a
    directory that holds one (a cookbook log_path).
    """
    path = Path(path)
    if path.is_file():
        return [path] if path.suffix == ".wandb" else []
    if not path.is_dir():
        return []
    found: set[Path] = set()
    for pattern in ("*.wandb", "*run-*/run-*.wandb", "wandb/*run-*/run-*.wandb"):
        for f in path.glob(pattern):
            if f.is_file() and "latest-run" not in f.parts:
                found.add(f.resolve())
    return sorted(found, key=lambda f: f.stat().st_mtime, reverse=True)


FLUSH_WAIT_SECONDS = 15.0
SETTLED_SECONDS = 3.0


def read_wandb_records(wandb_file: str | Path) -> tuple[list[dict[str, Any]], str]:
    """All records of a `.wandb` file as dicts `{"type": ..., <type>: {...}}`, and the name of the reader used.

    History records are normalised to `{"type": "history", "history": {"item": {key: value}, "step": int|None}}`
    and run records carry at least `run_id`, `project`, `display_name`.
    """
    # wandb's service process may still be writing the file when `finish()` returns (seen under load): a file
    # that cannot be read yet, or has no exit record, is read again for a while before the answer stands.
    wandb_file = Path(wandb_file)
    deadline = time.monotonic() + FLUSH_WAIT_SECONDS
    while True:
        # A file nobody has written to for a few seconds is as complete as it will get.
        settled = time.monotonic() > deadline or time.time() - wandb_file.stat().st_mtime > SETTLED_SECONDS
        try:
            records = _read_with_wandb_core(wandb_file)
        except Exception:
            if settled:
                raise
        else:
            if settled or any(r.get("type") == "exit" for r in records):
                return records, "wandb-core leet inspect"
        time.sleep(0.5)


def _read_with_wandb_core(wandb_file: Path) -> list[dict[str, Any]]:
    from wandb.util import get_core_path

    core = get_core_path()
    cmd = [core, "leet", "inspect", "--no-observability", "--json", "--run-file", str(wandb_file)]
    cmd.append(str(wandb_file.parent.parent))
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"wandb-core leet inspect exited {proc.returncode}: {proc.stderr.strip()[:300]}")
    records = []
    for line in proc.stdout.splitlines():
        line = line.strip()
        if not line.startswith("{"):
            continue
        rec = json.loads(line)
        if rec.get("type") == "history":
            hist = rec.get("history") or {}
            item = hist.get("item") or {}
            if isinstance(item, list):  # raw proto layout, should leet ever print it
                item = {_item_key(i): _json_or_raw(i.get("value_json")) for i in item}
            step = (hist.get("step") or {}).get("num")
            rec["history"] = {"item": item, "step": int(step) if step is not None else None}
        records.append(rec)
    if not records:
        raise RuntimeError("wandb-core printed no records")
    return records


def _item_key(item: dict) -> str:
    return item.get("key") or "/".join(item.get("nested_key") or [])


def _json_or_raw(value: str | None) -> Any:
    if value is None:
        return None
    try:
        return json.loads(value)
    except ValueError:
        return value


def _is_user_metric(key: str, value: Any) -> bool:
    if key.startswith("_"):
        return False
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(float(value))


def _summarize_offline(wandb_file: Path) -> dict[str, Any]:
    records, reader = read_wandb_records(wandb_file)
    run = next((r["run"] for r in records if r.get("type") == "run"), {})
    rows = [r["history"]["item"] for r in records if r.get("type") == "history"]
    metrics = sorted({k for row in rows for k, v in row.items() if _is_user_metric(k, v)})
    return {
        "file": wandb_file,
        "run_id": run.get("run_id", ""),
        "project": run.get("project", ""),
        "name": run.get("display_name", ""),
        "rows": rows,
        "metrics": metrics,
        "finished": any(r.get("type") == "exit" for r in records),
        "reader": reader,
    }


def _verify_offline(
    path: Path, project: str | None, run_name: str | None, expected: list[str]
) -> dict[str, Any]:
    files = find_wandb_run_files(path)
    if not files:
        return _result(
            "offline", str(path), False, [], f"no W&B run files (wandb/*run-*/run-*.wandb) under {path}"
        )
    runs = [_summarize_offline(f) for f in files]
    matching = [
        r
        for r in runs
        if (not project or r["project"] == project) and (not run_name or r["name"] == run_name)
    ]
    if not matching:
        seen = ", ".join(f"{r['project']}/{r['name'] or r['run_id']}" for r in runs)
        return _result(
            "offline",
            str(path),
            False,
            [],
            f"no W&B run named {run_name!r} in project {project!r} under {path} (found: {seen})",
        )
    run = matching[0]  # newest
    run_dir = str(run["file"].parent)
    missing = [k for k in expected if k not in run["metrics"]]
    where = f"offline run {run['run_id']} (project {run['project']!r}, name {run['name']!r}) read with {run['reader']}"
    unfinished = "" if run["finished"] else " (run not finished: no exit record yet)"
    if not run["rows"] or not run["metrics"]:
        return _result(
            "offline", run_dir, False, run["metrics"], f"{where}: no metrics were logged{unfinished}"
        )
    if missing:
        return _result(
            "offline",
            run_dir,
            False,
            run["metrics"],
            f"{where}: {len(run['rows'])} history rows but missing expected metrics {', '.join(missing)}"
            f"{unfinished}",
        )
    state = "finished" if run["finished"] else "not finished (no exit record)"
    return _result(
        "offline",
        run_dir,
        True,
        run["metrics"],
        f"{where}: {len(run['rows'])} history rows with {len(run['metrics'])} metrics; run {state}; "
        f"upload with `wandb sync {run_dir}`",
    )


# ------------------------------------------------------------------------------------------------ online


def _run_path_from_url(url: str) -> str | None:
    # https://wandb.ai/<entity>/<project>/runs/<id>[?...]
    tail = url.split("://", 1)[-1].split("?", 1)[0].split("#", 1)[0]
    parts = [p for p in tail.split("/") if p][1:]
    if len(parts) >= 4 and parts[2] == "runs":
        return f"{parts[0]}/{parts[1]}/{parts[3]}"
    return None


def _verify_online(
    path: Path | None, project: str | None, run_name: str | None, expected: list[str], url: str | None
) -> dict[str, Any]:
    import wandb

    api = wandb.Api(timeout=60)
    run_path = _run_path_from_url(url) if url else None
    if run_path is None and path is not None:
        local = [_summarize_offline(f) for f in find_wandb_run_files(path)]
        local = [r for r in local if not run_name or r["name"] == run_name] or local
        if local and local[0]["run_id"] and (project or local[0]["project"]):
            entity = os.environ.get("WANDB_ENTITY", "").strip()
            proj = project or local[0]["project"]
            run_path = f"{entity}/{proj}/{local[0]['run_id']}" if entity else f"{proj}/{local[0]['run_id']}"
    if run_path is not None:
        run = api.run(run_path)
    else:
        if not project:
            return _result(
                "online", url or "", False, [], "cannot locate the W&B run: no URL, run files or project"
            )
        entity = os.environ.get("WANDB_ENTITY", "").strip()
        candidates = list(
            api.runs(
                f"{entity}/{project}" if entity else project,
                filters={"display_name": run_name},
                order="-created_at",
                per_page=5,
            )
        )
        if not candidates:
            return _result(
                "online", url or "", False, [], f"no W&B run named {run_name!r} in project {project!r}"
            )
        run = candidates[0]
    rows = run.history(samples=1000, pandas=False) or []
    metrics = sorted({k for row in rows for k, v in row.items() if _is_user_metric(k, v)})
    run_url = getattr(run, "url", None) or url or ""
    missing = [k for k in expected if k not in metrics]
    if not rows or not metrics:
        return _result("online", run_url, False, metrics, f"W&B run {run.id}: no metrics in its history")
    if missing:
        return _result(
            "online",
            run_url,
            False,
            metrics,
            f"W&B run {run.id}: {len(rows)} history rows but missing expected metrics {', '.join(missing)}",
        )
    return _result(
        "online",
        run_url,
        True,
        metrics,
        f"W&B run {run.id}: {len(rows)} history rows with {len(metrics)} metrics",
    )


def _result(mode: str, url_or_path: str, verified: bool, metrics: list[str], detail: str) -> dict[str, Any]:
    return {
        "mode": mode,
        "url_or_path": redact(url_or_path),
        "verified": bool(verified),
        "metrics_found": list(metrics),
        "detail": redact(detail),
    }


def verify_wandb(
    run_dir_or_log_path: str | Path | None,
    project: str | None,
    run_name: str | None,
    mode: str,
    *,
    expected_metrics: list[str] | None = None,
    url: str | None = None,
) -> dict[str, Any]:
    """Check that a W&B run holds logged metrics.

    Returns `{"mode", "url_or_path", "verified", "metrics_found", "detail"}` (no secrets). Offline: reads the
    newest `.wandb` file under `run_dir_or_log_path` whose run matches `project`/`run_name` (None = any) and
    checks it has history rows with user metrics (all of `expected_metrics`, if given). Online: asks the W&B API
    (`wandb.Api().run(...)`, located by `url`, else by the run id in the local run files, else by display name)
    for the run's history. Never raises for a failed check: errors become `verified: False` with the reason.
    """
    if mode not in ("online", "offline"):
        raise ValueError(f"mode must be 'online' or 'offline', got {mode!r}")
    expected = list(expected_metrics or [])
    path = Path(run_dir_or_log_path) if run_dir_or_log_path is not None else None
    try:
        if mode == "offline":
            if path is None:
                return _result("offline", "", False, [], "no log path given for an offline W&B run")
            return _verify_offline(path, project, run_name, expected)
        return _verify_online(path, project, run_name, expected, url)
    except Exception as e:  # network, auth, corrupt file: a failed verification, reported
        return _result(mode, url or (str(path) if path else ""), False, [], f"{type(e).__name__}: {e}")


@contextlib.contextmanager
def own_service() -> Iterator[None]:
    """The run's W&B runs get a W&B service of their own, ended with the run. The service resolves a run's relative
    directory against its own working directory, fixed when it started: a service left by earlier W&B use in this
    process (a run from Python in another directory) or inherited from a parent process would write the run files
    into directories that do not exist, and the run's W&B runs would be lost. One with a run still open is left
    alone. A W&B run a loop of this run opened and never finished (the run stopped part-way) is finished as failed:
    left open, it would be the next run's in this process (the loop's `wandb.init` returns it, and its config
    clashes with the next loop's)."""
    before = _open_run()
    _end_idle_service()
    try:
        yield
    finally:
        left = _open_run()
        if left is not None and left is not before:
            # Never in the way of the run's own error (a full disk fails the footer W&B writes on finishing).
            with contextlib.suppress(Exception):
                left.finish(exit_code=1)
        _end_idle_service()


def _open_run() -> Any:
    wandb = sys.modules.get("wandb")  # None: never imported here
    return wandb.run if wandb is not None else None


def _end_idle_service() -> None:
    wandb = sys.modules.get("wandb")  # None: never imported here
    if wandb is not None and wandb.run is not None:
        return
    if wandb is not None:
        wandb.teardown()
    # Inherited from a parent process that logs to W&B, or left by one already ended: not this run's service.
    os.environ.pop("WANDB_SERVICE", None)


# ------------------------------------------------------------------------------------------ final metrics


def log_final_metrics(
    project: str,
    run_name: str,
    metrics: dict[str, float | int | str | None],
    *,
    wandb_dir: str | Path,
    mode: str | None = None,
    config: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Log the eval summary (baseline vs trained) as a small run `<run_name>-eval` in `project`, group `run_name`.

    Numbers are logged as one history row and set in the run summary; everything goes into the run summary.
    Returns `{"mode", "run_id", "name", "url_or_path"}` (URL online, the offline run directory offline); verify
    it with `verify_wandb(wandb_dir, project, f"{run_name}-eval", mode)`.
    """
    import wandb

    mode = mode or wandb_mode()
    Path(wandb_dir).mkdir(parents=True, exist_ok=True)
    numeric = {
        k: v
        for k, v in metrics.items()
        if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(float(v))
    }
    name = f"{run_name}-eval"
    run = wandb.init(
        project=project,
        name=name,
        group=run_name,
        job_type="eval",
        dir=str(wandb_dir),
        mode=mode,
        config=config or {},
        reinit="create_new",
    )
    try:
        if numeric:
            run.log(numeric)
        run.summary.update({k: v for k, v in metrics.items() if v is not None})
        url = run.url if mode == "online" else None
        run_dir = str(Path(run.dir).parent)
        run_id = run.id
    finally:
        run.finish()
    return {"mode": mode, "run_id": run_id, "name": name, "url_or_path": redact(url or run_dir)}
