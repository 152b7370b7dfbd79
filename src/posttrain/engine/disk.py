"""The checkpoint store's folders as files: what each run folder holds, how big and how old it is, when a
checkpoint expires, and removing a run folder. `checkpoints.CheckpointStore` writes and reads checkpoints;
this module only looks at the layout (`<root>/<run_id>/run.json`, `<root>/<run_id>/<kind>/<name>/meta.json`),
without torch, so `posttrain cache` answers at once.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path


def cache_root() -> Path:
    """posttrain's cache: converted models, search indexes, and the engine's checkpoints (`checkpoints/`)."""
    return Path(os.environ.get("POSTTRAIN_CACHE", Path.home() / ".cache" / "posttrain"))


# Checkpoint kind (the folder, as in tinker:// paths) -> the checkpoint type the REST API reports.
KINDS = {"weights": "training", "sampler_weights": "sampler", "external_weights": "external"}


def read_json(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def expires_at(meta: dict) -> float | None:
    """When a checkpoint expires (POSIX time), from the `ttl_seconds` its save (or a later TTL change) gave;
    None: never. A TTL counts from the last change of it, else from the save, as Tinker's does."""
    ttl = meta.get("ttl_seconds")
    if not ttl:
        return None
    return float(meta.get("ttl_from", meta.get("time", 0.0))) + float(ttl)


def checkpoint_metas(run_dir: Path) -> list[tuple[str, str, Path]]:
    """(kind, name, meta.json) of every complete checkpoint in a run folder (a staging folder, `.staging-*`, is
    a write in progress, not a checkpoint)."""
    found = []
    for kind in KINDS:
        for meta_file in sorted((run_dir / kind).glob("*/meta.json")):
            if not meta_file.parent.name.startswith("."):
                found.append((kind, meta_file.parent.name, meta_file))
    return found


def holds_only_run_info(run_dir: Path) -> bool:
    """Whether a run folder has no file but its run.json: no checkpoint, none being written."""
    info = run_dir / "run.json"
    return run_dir.is_dir() and not any(f != info and not f.is_dir() for f in run_dir.rglob("*"))


def remove_folder(path: Path) -> None:
    # Another process may be removing the same folder (two engines, or `posttrain cache prune`, on one store).
    shutil.rmtree(path, ignore_errors=True)


def folder_usage(path: Path) -> tuple[int, float]:
    """Total size in bytes of the files under `path`, and the newest modification time among it and them."""
    size, newest = 0, _mtime(path)
    for f in path.rglob("*"):
        try:
            stat = f.lstat()
        except OSError:  # removed while we looked
            continue
        newest = max(newest, stat.st_mtime)
        if not f.is_dir():
            size += stat.st_size
    return size, newest


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0


@dataclass
class RunFolder:
    """One run's folder in the checkpoint store, as `posttrain cache` lists it."""

    run_id: str
    path: Path
    size_bytes: int
    modified: float  # newest file in it
    checkpoints: list[str] = field(default_factory=list)  # "kind/name"
    base_model: str | None = None
    user_metadata: dict = field(default_factory=dict)


def run_folders(root: Path) -> list[RunFolder]:
    """Every run folder in a checkpoint store, least recently modified first."""
    if not root.is_dir():
        return []
    folders = []
    for path in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        size, modified = folder_usage(path)
        info = read_json(path / "run.json") or {}
        metadata = info.get("user_metadata")
        folders.append(
            RunFolder(
                run_id=path.name,
                path=path,
                size_bytes=size,
                modified=modified,
                checkpoints=[f"{kind}/{name}" for kind, name, _ in checkpoint_metas(path)],
                base_model=info.get("base_model"),
                user_metadata=metadata if isinstance(metadata, dict) else {},
            )
        )
    return sorted(folders, key=lambda f: f.modified)


def other_caches(cache_root: Path, checkpoint_root: Path) -> list[tuple[Path, int]]:
    """The folders of posttrain's cache beside the checkpoint store (converted models, search indexes), sized."""
    if not cache_root.is_dir():
        return []
    others = []
    for path in sorted(p for p in cache_root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        if os.path.realpath(path) != os.path.realpath(checkpoint_root):
            others.append((path, folder_usage(path)[0]))
    return others


def stale(folders: list[RunFolder], older_than_s: float, now: float | None = None) -> list[RunFolder]:
    """The run folders in which nothing changed for longer than `older_than_s` seconds."""
    cutoff = (time.time() if now is None else now) - older_than_s
    return [f for f in folders if f.modified < cutoff]
