"""The user's corpus for `env=tools:search corpus=FILE`: JSONL, one passage a line, `text` required, `id` and
`title` optional (a passage without an id is known by its line number). Checked whole before anything is spent:
each bad row is one line naming the file, the line and the field."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import chz

from posttrain.config.checks import not_blank
from posttrain.errors import ConfigError, DataError
from posttrain.pipeline.envs.spec import parse_env

if TYPE_CHECKING:
    from posttrain.pipeline.data import LoadedData
    from posttrain.pipeline.envs.spec import EnvSpec


# env=tools:search's retriever: embeddings in a Chroma index, or BM25 (no embedding model).
SearchRetriever = Literal["chroma", "bm25"]


@chz.chz
class SearchOptions:
    """Task=rl only: the search tool's corpus is what the policy searches while it trains and is evaluated;
    distillation takes an environment's prompts, never its tools."""

    corpus: str | None = chz.field(
        default=None,
        doc="env=tools:search: your passages, a JSONL file (text, optional id and title), searched to answer the "
        "questions of dataset= (None: the shipped corpus and its own questions)",
    )
    retriever: SearchRetriever | None = chz.field(
        default=None,
        doc="env=tools:search: chroma (all-MiniLM-L6-v2 embeddings, index cached by the corpus's hash) or bm25 "
        "(None: chroma with corpus=, else bm25)",
    )

    @staticmethod
    def check(cfg: Any) -> None:
        not_blank(cfg, "corpus")
        if cfg.corpus is not None and not Path(cfg.corpus).expanduser().is_file():
            raise ConfigError(f"corpus={cfg.corpus}: no such file")

    @staticmethod
    def chosen(cfg: Any) -> dict[str, Any]:
        """The retriever env=tools:search runs with when none is given (`settings.method_config` fills it in), so
        that summary.json's hyperparameters record it rather than None."""
        if cfg.retriever is None and cfg.env is not None and parse_env(cfg.env).key == "tools:search":
            return {"retriever": "chroma" if cfg.corpus is not None else "bm25"}
        return {}


@dataclass(frozen=True)
class Corpus:
    path: Path
    sha256: str  # of the file's bytes: the index cache is keyed by it, so an edited corpus is embedded anew
    passages: tuple[dict, ...]  # {"id": str, "text": str, "title"?: str}


def shown(passage: dict) -> str:
    """What is searched and what the tool replies: the text, after its title where it has one."""
    return f"{passage['title']}: {passage['text']}" if passage.get("title") else passage["text"]


def check_inputs(spec: EnvSpec, cfg: Any, data: LoadedData | None) -> None:
    """`env=tools:search` over the user's corpus: the corpus and its questions checked before the tool set is
    imported (the cookbook's tool use, the Tinker SDK and torch: seconds), so a bad file is refused at once."""
    corpus = getattr(cfg, "corpus", None)
    if spec.variant == "search" and (corpus is not None or data is not None):
        checked(Path(corpus).expanduser().resolve() if corpus is not None else None, data)


def checked(corpus: Path | None, data: LoadedData | None) -> Corpus:
    """The user's corpus (parsed once per process) with the question/answer rows about it, or a one-line error."""
    if corpus is None:
        raise ConfigError(
            "env=tools:search with dataset=: the questions need the corpus they are about (corpus=docs.jsonl, "
            'JSONL rows with a "text" field); leave dataset= out to use the shipped corpus'
        )
    if data is None:
        raise ConfigError(f"corpus={corpus} needs the questions about it: dataset= with question/answer rows")
    if data.format != "question_answer":
        raise ConfigError(
            f"corpus={corpus}: dataset= must hold question/answer rows (question and answer fields), not "
            f"{data.format} rows"
        )
    return loaded(corpus)


@cache
def loaded(path: Path) -> Corpus:
    """`load`, once per file and process: the check before the heavy imports and the retriever share it."""
    return load(path)


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
        raise DataError(f'corpus={path}: no passages (expected JSONL rows with a "text" field)')
    return Corpus(path, hashlib.sha256(data).hexdigest(), tuple(passages))


def _passage(line: str, where: str, number: int) -> dict:
    try:
        row = json.loads(line)
    except ValueError as exc:
        raise DataError(f"{where}: not valid JSON ({exc.msg})") from None
    if not isinstance(row, dict):
        raise DataError(f'{where}: expected a JSON object with a "text" field')
    text = row.get("text")
    if not isinstance(text, str) or not text.strip():
        raise DataError(f'{where}: no "text" (every passage needs a non-empty text)')
    ident = row.get("id", number)
    # bool is an int subclass, never a meaningful id
    if isinstance(ident, bool) or not isinstance(ident, str | int) or not str(ident).strip():
        raise DataError(f'{where}: "id" must be a non-empty string or an integer')
    passage = {"id": str(ident), "text": text.strip()}
    title = row.get("title")
    if title is not None:
        if not isinstance(title, str):
            raise DataError(f'{where}: "title" must be a string')
        if title.strip():
            passage["title"] = title.strip()
    return passage
