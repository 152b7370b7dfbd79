"""The user's corpus for `env=tools:search corpus=FILE`: JSONL, one passage a line, `text` required, `id` and
`title` optional (a passage without an id is known by its line number). Checked whole before anything is spent:
each bad row is one line naming the file, the line and the field."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from posttrain.errors import DataError


@dataclass(frozen=True)
class Corpus:
    path: Path
    sha256: str  # of the file's bytes: the index cache is keyed by it, so an edited corpus is embedded anew
    passages: tuple[dict, ...]  # {"id": str, "text": str, "title"?: str}


def shown(passage: dict) -> str:
    """What is searched and what the tool replies: the text, after its title where it has one."""
    return f"{passage['title']}: {passage['text']}" if passage.get("title") else passage["text"]


def load(path: Path) -> Corpus:
    if not path.is_file():
        raise DataError(f"corpus={path}: no such file")
    data = path.read_bytes()
    passages: list[dict] = []
    seen: dict[str, int] = {}
    for number, line in enumerate(data.decode("utf-8", errors="replace").splitlines(), 1):
        if line.strip():
            passage = _passage(line, f"corpus={path} line {number}", number)
            if passage["id"] in seen:
                raise DataError(
                    f"corpus={path} line {number}: id {passage['id']!r} is also on line {seen[passage['id']]}; "
                    "ids must be unique"
                )
            seen[passage["id"]] = number
            passages.append(passage)
    if not passages:
        raise DataError(f"corpus={path}: no passages (expected JSONL rows with a \"text\" field)")
    return Corpus(path, hashlib.sha256(data).hexdigest(), tuple(passages))


def _passage(line: str, where: str, number: int) -> dict:
    try:
        row = json.loads(line)
    except ValueError as exc:
        raise DataError(f"{where}: not valid JSON ({exc.msg})") from None
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected a JSON object with a \"text\" field")
    text = row.get("text")
    if not isinstance(text, str) or not text.strip():
        raise DataError(f"{where}: no \"text\" (every passage needs a non-empty text)")
    ident = row.get("id", number)
    # bool is an int subclass, never a meaningful id
    if isinstance(ident, bool) or not isinstance(ident, str | int) or not str(ident).strip():
        raise DataError(f"{where}: \"id\" must be a non-empty string or an integer")
    passage = {"id": str(ident), "text": text.strip()}
    title = row.get("title")
    if title is not None:
        if not isinstance(title, str):
            raise DataError(f"{where}: \"title\" must be a string")
        if title.strip():
            passage["title"] = title.strip()
    return passage
