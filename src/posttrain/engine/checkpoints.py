"""Checkpoints on disk, addressed as `tinker://RUN/weights|sampler_weights|external_weights/NAME`.

Layout: `<root>/<run_id>/run.json` (base model, LoRA settings, metadata) and
`<root>/<run_id>/<kind>/<name>/{adapter.safetensors, optimizer.pt, meta.json}`; an external-weights export holds
the files a user downloads instead (`adapter_model.safetensors`, `adapter_config.json`, each `.age` when
encrypted). Every write goes to a staging
directory first, flushed to disk and renamed into place, so a crash never leaves a half-written checkpoint;
meta.json records each file's SHA-256, so a checkpoint damaged afterwards (a truncated copy, a bad disk) is
refused by name on load rather than loaded as garbage. A checkpoint saved with `ttl_seconds` is deleted once that
has passed (`expire`, called by the engine at start and after each save); one saved without is kept, as Tinker
keeps it (`posttrain cache prune` removes old runs on request).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from posttrain.engine.disk import KINDS, expires_at, holds_only_run_info, read_json, remove_folder
from posttrain.engine.errors import WireError
from posttrain.util import atomic_write_text, iso_time, replaced_directory

_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._\-]{0,199}$")
_SAFE_RUN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:\-]{0,199}$")


@dataclass(frozen=True)
class CheckpointRef:
    run_id: str
    kind: str  # "weights" | "sampler_weights"
    name: str

    @property
    def tinker_path(self) -> str:
        return f"tinker://{self.run_id}/{self.kind}/{self.name}"


def check_name(name: str, what: str = "checkpoint name") -> str:
    if not _SAFE_NAME.match(name) or name in {".", ".."}:
        raise WireError(
            f"{what} {name!r} is not allowed: use letters, digits, '.', '_' and '-' (no '/', no leading '.')"
        )
    return name


def parse_tinker_path(path: str) -> CheckpointRef:
    if not path.startswith("tinker://"):
        raise WireError(f"{path!r} is not a tinker:// checkpoint path")
    parts = path[len("tinker://") :].split("/")
    if len(parts) != 3 or parts[1] not in KINDS:
        raise WireError(
            f"{path!r}: expected tinker://RUN_ID/weights/NAME, tinker://RUN_ID/sampler_weights/NAME or "
            "tinker://RUN_ID/external_weights/NAME"
        )
    run_id, kind, name = parts
    if not _SAFE_RUN.match(run_id):
        raise WireError(f"{path!r}: invalid run id {run_id!r}")
    return CheckpointRef(run_id, kind, check_name(name))


class CheckpointStore:
    def __init__(self, root: Path):
        self.root = root
        self.root.mkdir(parents=True, exist_ok=True)

    def run_dir(self, run_id: str) -> Path:
        if not _SAFE_RUN.match(run_id):
            raise WireError(f"invalid run id {run_id!r}")
        return self.root / run_id

    def _dir(self, ref: CheckpointRef) -> Path:
        return self.run_dir(ref.run_id) / ref.kind / ref.name

    # runs -----------------------------------------------------------------------------------------------
    def write_run(self, run_id: str, info: dict) -> None:
        directory = self.run_dir(run_id)
        directory.mkdir(parents=True, exist_ok=True)
        atomic_write_text(directory / "run.json", json.dumps(info, indent=2))

    def read_run(self, run_id: str) -> dict | None:
        try:
            return json.loads((self.run_dir(run_id) / "run.json").read_text())
        except (OSError, ValueError):
            return None

    def list_runs(self) -> list[str]:
        return sorted(p.parent.name for p in self.root.glob("*/run.json"))

    # checkpoints ----------------------------------------------------------------------------------------
    def exists(self, ref: CheckpointRef) -> bool:
        return (self._dir(ref) / "meta.json").exists()

    def save(
        self,
        ref: CheckpointRef,
        adapter: dict[str, torch.Tensor],
        meta: dict,
        optimizer: dict | None = None,
        overwrite: bool = False,
    ) -> None:
        def fill(staging: Path) -> None:
            save_file(
                {k: v.detach().contiguous().cpu() for k, v in adapter.items()},
                staging / "adapter.safetensors",
            )
            if optimizer is not None:
                torch.save(optimizer, staging / "optimizer.pt")

        self._write(ref, fill, meta, overwrite)

    def save_files(self, ref: CheckpointRef, files: dict[str, bytes], meta: dict, overwrite: bool) -> int:
        """An export: the named files as they are; returns their total size in bytes."""

        def fill(staging: Path) -> None:
            for name, data in files.items():
                (staging / check_name(name, "file name")).write_bytes(data)

        self._write(ref, fill, {**meta, "files": sorted(files)}, overwrite)
        return sum(len(data) for data in files.values())

    def _write(self, ref: CheckpointRef, fill: Callable[[Path], None], meta: dict, overwrite: bool) -> None:
        target = self._dir(ref)
        if target.exists() and not overwrite:
            raise WireError(
                f"checkpoint {ref.tinker_path} already exists (pass overwrite=True to replace it)"
            )
        with replaced_directory(target) as staging:
            fill(staging)
            digests = {f.name: _sha256(f) for f in sorted(staging.iterdir())}
            meta = {**meta, "time": time.time(), "sha256": digests}
            (staging / "meta.json").write_text(json.dumps(meta, indent=2))

    def load(
        self, ref: CheckpointRef, with_optimizer: bool
    ) -> tuple[dict[str, torch.Tensor], dict, dict | None]:
        directory = self._dir(ref)
        if not (directory / "meta.json").exists():
            raise WireError(f"checkpoint {ref.tinker_path} not found")
        names = ["meta.json", "adapter.safetensors"]
        if with_optimizer:
            if not (directory / "optimizer.pt").exists():
                raise WireError(
                    f"checkpoint {ref.tinker_path} has no optimizer state (it was saved for sampling)"
                )
            names.append("optimizer.pt")
        name = names[0]
        try:
            meta = json.loads((directory / name).read_text())
            for name in names[1:]:
                expected = meta.get("sha256", {}).get(name)  # older checkpoints have none
                if expected is not None and _sha256(directory / name) != expected:
                    raise ValueError("its contents differ from what was saved (SHA-256)")
            name = "adapter.safetensors"
            adapter = load_file(directory / name)
            name = "optimizer.pt"
            optimizer = torch.load(directory / name, weights_only=True) if with_optimizer else None
        except Exception as exc:  # noqa: BLE001 - truncated, altered or unreadable: one line naming the file
            raise WireError(
                f"checkpoint {ref.tinker_path} is damaged: {directory / name}: {str(exc)[:200]}"
            ) from None
        return adapter, meta, optimizer

    def meta(self, ref: CheckpointRef) -> dict:
        try:
            return json.loads((self._dir(ref) / "meta.json").read_text())
        except (OSError, ValueError):
            raise WireError(f"checkpoint {ref.tinker_path} not found") from None

    def exported_file(self, ref: CheckpointRef, name: str) -> Path:
        """One file of an external-weights export, checked against the digest recorded when it was written."""
        meta = self.meta(ref)
        if name not in meta.get("files", []):
            raise WireError(f"{ref.tinker_path} has no file {name!r}")
        path = self._dir(ref) / name
        if _sha256(path) != meta["sha256"].get(name):
            raise WireError(
                f"checkpoint {ref.tinker_path} is damaged: {path}: its contents differ from what was saved"
            )
        return path

    def set_ttl(self, ref: CheckpointRef, ttl_seconds: int | None) -> None:
        """Expire `ttl_seconds` from now (None: never)."""
        meta = self.meta(ref)
        meta.update(ttl_seconds=ttl_seconds, ttl_from=time.time())
        atomic_write_text(self._dir(ref) / "meta.json", json.dumps(meta, indent=2))

    def delete(self, ref: CheckpointRef) -> bool:
        target = self._dir(ref)
        if not target.exists():
            return False
        shutil.rmtree(target)
        # An emptied kind folder goes too, so a run whose last checkpoint was deleted (the export a download
        # made) is seen as holding nothing (`remove_if_empty`). rmdir never removes a folder that still holds
        # something, e.g. a checkpoint being written into it at this moment.
        with contextlib.suppress(OSError):
            target.parent.rmdir()
        return True

    def remove_if_empty(self, run_id: str) -> bool:
        """Remove a run folder that holds nothing but its run.json (no checkpoint)."""
        directory = self.run_dir(run_id)
        if not holds_only_run_info(directory):
            return False
        remove_folder(directory)
        return True

    def expire(self, keep: Callable[[CheckpointRef], bool], now: float | None = None) -> list[CheckpointRef]:
        """Delete the checkpoints whose TTL (`ttl_seconds` of their save, or a later TTL change) has passed,
        except those `keep` names; returns those deleted. A scan of the meta.json files only."""
        now = time.time() if now is None else now
        gone = []
        for meta_file in self.root.glob("*/*/*/meta.json"):
            run_id, kind, name = meta_file.parts[-4:-1]
            meta = read_json(meta_file)
            when = expires_at(meta) if meta is not None else None
            if kind not in KINDS or when is None or when > now or not _SAFE_NAME.match(name):
                continue
            ref = CheckpointRef(run_id, kind, name)
            if _SAFE_RUN.match(run_id) and not keep(ref) and self._delete_quietly(ref):
                gone.append(ref)
        return gone

    def _delete_quietly(self, ref: CheckpointRef) -> bool:
        try:
            return self.delete(ref)
        except OSError:  # another process (a second engine, `posttrain cache prune`) removed it first
            return False

    def list(self, run_id: str) -> list[dict]:
        out = []
        for kind, ctype in KINDS.items():
            for meta_file in sorted((self.run_dir(run_id) / kind).glob("*/meta.json")):
                try:
                    meta = json.loads(meta_file.read_text())
                except (OSError, ValueError):
                    continue
                ref = CheckpointRef(run_id, kind, meta_file.parent.name)
                size = sum(f.stat().st_size for f in meta_file.parent.iterdir() if f.is_file())
                entry = {
                    "checkpoint_id": f"{kind}/{ref.name}",
                    "checkpoint_type": ctype,
                    "time": iso_time(meta.get("time", meta_file.stat().st_mtime)),
                    "tinker_path": ref.tinker_path,
                    "size_bytes": size,
                    "public": False,
                }
                if (expiry := expires_at(meta)) is not None:
                    entry["expires_at"] = iso_time(expiry)
                if meta.get("user_metadata"):
                    entry["user_metadata"] = meta["user_metadata"]
                out.append(entry)
        return sorted(out, key=lambda e: e["time"])


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()
