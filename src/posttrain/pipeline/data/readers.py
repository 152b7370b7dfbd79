"""Reading a local data file (.jsonl/.json/.csv/.parquet) into rows, each with where it came from ("file line 3"),
so a bad row is reported by file and line."""

from __future__ import annotations

import codecs
import csv
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from posttrain.errors import DataError
from posttrain.util import short_error

_JSONL_SUFFIXES = (".jsonl", ".ndjson", ".jsonlines")
SUPPORTED_SUFFIXES = (*_JSONL_SUFFIXES, ".json", ".csv", ".parquet")
# CSV cells are text; these columns may hold a JSON list of messages instead of plain text.
_JSON_CELL_COLUMNS = frozenset({"messages", "conversations", "prompt", "completion", "chosen", "rejected"})
_ALWAYS_LIST_COLUMNS = frozenset({"messages", "conversations"})
_JSON_CONTAINER_KEYS = ("data", "train", "rows")


def read_rows(path: str) -> Iterator[tuple[str, dict]]:
    """Rows of a local .jsonl/.json/.csv/.parquet file, each with a `where` such as "data.jsonl line 3".

    The path is checked at call time, so a missing file or unknown extension fails before iteration.
    """
    file = Path(path).expanduser()
    if not file.exists():
        raise DataError(f"{path}: file not found")
    if file.is_dir():
        raise DataError(f"{path}: is a directory; pass a data file ({', '.join(SUPPORTED_SUFFIXES)})")
    suffix = file.suffix.lower()
    if suffix in _JSONL_SUFFIXES:
        return _read_jsonl(file, path)
    if suffix == ".json":
        return _read_json(file, path)
    if suffix == ".csv":
        return _read_csv(file, path)
    if suffix == ".parquet":
        return _read_parquet(file, path)
    raise DataError(
        f'{path}: unsupported file type "{file.suffix or "(no extension)"}"; '
        f"supported: {', '.join(SUPPORTED_SUFFIXES)}"
    )


def _read_jsonl(file: Path, name: str) -> Iterator[tuple[str, dict]]:
    # Binary read so a bad byte is reported with its line number rather than as a stream error.
    with file.open("rb") as handle:
        for lineno, raw in enumerate(handle, start=1):
            where = f"{name} line {lineno}"
            try:
                text = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
            except UnicodeDecodeError as exc:
                raise DataError(f"{where}: {_not_utf8(raw if lineno == 1 else b'', exc)}") from exc
            if not text.strip():
                continue
            try:
                row = json.loads(text)
            except json.JSONDecodeError as exc:
                raise DataError(f"{where}: invalid JSON ({exc.msg} at column {exc.colno})") from exc
            if not isinstance(row, dict):
                raise DataError(f"{where}: expected one JSON object per line, got {type(row).__name__}")
            yield where, row


def _not_utf8(start: bytes, exc: UnicodeDecodeError) -> str:
    """Why the bytes are not UTF-8, naming UTF-16/32 when a byte-order mark says so (Windows tools' exports)."""
    for bom, encoding in (
        (codecs.BOM_UTF32_LE, "UTF-32"),
        (codecs.BOM_UTF32_BE, "UTF-32"),
        (codecs.BOM_UTF16_LE, "UTF-16"),
        (codecs.BOM_UTF16_BE, "UTF-16"),
    ):
        if start.startswith(bom):
            return f"the file is {encoding} encoded; save it as UTF-8"
    return f"not valid UTF-8 ({exc.reason} at byte {exc.start}); save the file as UTF-8"


def _read_json(file: Path, name: str) -> Iterator[tuple[str, dict]]:
    try:
        document = json.loads(file.read_text(encoding="utf-8-sig"))
    except UnicodeDecodeError as exc:
        raise DataError(f"{name}: {_not_utf8(exc.object[:4], exc)}") from exc
    except json.JSONDecodeError as exc:
        raise DataError(f"{name} line {exc.lineno}: invalid JSON ({exc.msg} at column {exc.colno})") from exc
    items = _json_items(document, name)
    for index, item in enumerate(items, start=1):
        where = f"{name} row {index}"
        if not isinstance(item, dict):
            raise DataError(f"{where}: expected a JSON object, got {type(item).__name__}")
        yield where, item


def _json_items(document: Any, name: str) -> list:
    if isinstance(document, list):
        return document
    if isinstance(document, dict):
        for key in _JSON_CONTAINER_KEYS:
            if isinstance(document.get(key), list):
                return document[key]
    got = type(document).__name__ if not isinstance(document, dict) else "an object without such a list"
    raise DataError(
        f'{name}: expected a JSON list of objects (or an object with a list under "data", "train" or "rows"), got {got}'
    )


def _read_csv(file: Path, name: str) -> Iterator[tuple[str, dict]]:
    with file.open(encoding="utf-8-sig", newline="") as handle:
        reader = csv.reader(handle)
        try:
            header = next(reader, None)
            if header is None:
                return
            header = [h.strip() for h in header]
            repeated = sorted({h for h in header if header.count(h) > 1})
            if repeated:
                raise DataError(f"{name} line 1: column {repeated[0]!r} appears more than once in the header")
            previous_end = reader.line_num
            for record in reader:
                # A record may span several physical lines; report the line it starts on.
                start, previous_end = previous_end + 1, reader.line_num
                if not any(cell.strip() for cell in record):
                    continue
                where = f"{name} line {start}"
                if len(record) != len(header):
                    raise DataError(
                        f"{where}: expected {len(header)} cells ({', '.join(header)}), got {len(record)}"
                    )
                yield (
                    where,
                    {key: _csv_cell(key, cell, where) for key, cell in zip(header, record, strict=True)},
                )
        except (csv.Error, UnicodeDecodeError) as exc:
            raise DataError(
                f"{name} line {reader.line_num}: cannot parse CSV ({short_error(exc, limit=200, with_type=False)})"
            ) from exc


def _csv_cell(column: str, cell: str, where: str) -> Any:
    if column not in _JSON_CELL_COLUMNS or not cell.lstrip().startswith("["):
        return cell
    try:
        parsed = json.loads(cell)
    except json.JSONDecodeError as exc:
        # Plain prompt text may legitimately start with "["; only message columns must be JSON.
        if column in _ALWAYS_LIST_COLUMNS:
            raise DataError(
                f'{where}: field "{column}" looks like a JSON list but is not valid JSON ({exc.msg})'
            ) from exc
        return cell
    if column in _ALWAYS_LIST_COLUMNS:
        return parsed
    return parsed if isinstance(parsed, list) and all(isinstance(m, dict) for m in parsed) else cell


def _read_parquet(file: Path, name: str) -> Iterator[tuple[str, dict]]:
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(file)
        index = 0
        # Batches keep memory flat and let us stop early once the row cap is reached.
        for batch in parquet.iter_batches(batch_size=1_024):
            for row in batch.to_pylist():
                index += 1
                yield f"{name} row {index}", row
    except DataError:
        raise
    except Exception as exc:  # pyarrow raises several unrelated types for corrupt files
        raise DataError(
            f"{name}: cannot read as Parquet ({short_error(exc, limit=200, with_type=False)})"
        ) from exc
