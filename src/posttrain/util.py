"""Small helpers with one home each: atomic writes, JSONL files, secret redaction, short error text.

Stdlib only, so the engine and the pipeline can both use them without importing each other.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

# The secrets a run may hold in its environment (from .env); their values never reach logs or results.
SECRET_ENV_VARS = ("TINKER_API_KEY", "WANDB_API_KEY")
# The data files that ship with posttrain (the default SFT data, the search corpus, example rubrics and pairs).
PACKAGE_DATA = Path(__file__).resolve().parent / "data"
_FILE_MODE = 0o644  # mkstemp creates 0600; results are meant to be read by others


def redact(text: str) -> str:
    """Replace the values of TINKER_API_KEY and WANDB_API_KEY (from os.environ) in `text` with '***'."""
    secrets = sorted(
        {v for name in SECRET_ENV_VARS if (v := os.environ.get(name, "").strip()) and len(v) >= 4},
        key=len,
        reverse=True,
    )
    for secret in secrets:
        text = text.replace(secret, "***")
    return text


def short_error(exc: BaseException, limit: int = 300, with_type: bool = True) -> str:
    """The first line of the message ('TypeName: ...' with `with_type`), at most `limit` characters."""
    text = str(exc).strip()
    first = text.splitlines()[0] if text else ""
    if with_type or not first:
        first = f"{type(exc).__name__}: {first}" if first else type(exc).__name__
    return first if len(first) <= limit else first[: limit - 3] + "..."


def round_up(n: int, multiple: int) -> int:
    """The smallest multiple of `multiple` that is >= n."""
    return -(-n // multiple) * multiple


def iso_time(ts: float) -> str:
    """A POSIX timestamp as an ISO-8601 UTC string."""
    return datetime.fromtimestamp(ts, UTC).isoformat()


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write through a temp file in the same directory and os.replace: readers see the old or the new file."""
    with atomic_output_path(path) as tmp, open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    return Path(path)


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


@contextmanager
def atomic_output_path(path: str | Path) -> Iterator[Path]:
    """Yield a temp path beside `path` for a library that writes files itself (matplotlib); replace on success."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=path.suffix, dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, _FILE_MODE)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


@contextmanager
def replaced_directory(target: Path) -> Iterator[Path]:
    """Yield a staging directory beside `target`; when the block succeeds it takes `target`'s place."""
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=".staging-"))
    try:
        yield staging
        for f in (f for f in staging.rglob("*") if f.is_file()):  # on disk before the rename: whole or absent
            with open(f, "rb") as handle:
                os.fsync(handle.fileno())
        if target.exists():
            shutil.rmtree(target)
        os.replace(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def jsonl_text(rows: Iterable[Any]) -> str:
    """One compact JSON object per line (UTF-8 kept as is)."""
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


def write_jsonl(path: str | Path, rows: Iterable[Any]) -> Path:
    """Write rows as JSONL, atomically."""
    return atomic_write_text(path, jsonl_text(rows))


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """Every non-blank line of a JSONL file, parsed."""
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def processor() -> dict[str, Any]:
    """The processor's model and its flags that decide bf16 speed (avx2 only, avx512_bf16, AMX): what a measured
    number holds for."""
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
    except OSError:
        cpuinfo = ""
    flags = sorted({f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f" {f}" in cpuinfo})
    model = next(
        (line.split(":", 1)[1].strip() for line in cpuinfo.splitlines() if "model name" in line), "unknown"
    )
    return {"cpu": model, "cpu_flags": flags}
