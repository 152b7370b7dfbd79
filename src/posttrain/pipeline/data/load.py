"""Load a training dataset (local file or Hugging Face Hub) and its eval split, validated and normalized.

Every row that will be used is checked here, before any compute is spent, so a bad row far into a file is
reported as one line naming the file, the line and the field. Size limits follow the spec's Data
Preparation section: at most 20,000 training rows, and evaluation at most 10% of the training rows (max 2,000)
whatever its source (carved from the training rows, a Hub test split, or eval_dataset=; a larger given set is
sampled with seed 42); Hub datasets are always streamed.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any

from posttrain.errors import DataError
from posttrain.pipeline.data.formats import (
    CHAT_FORMATS,
    FormatName,
    detect_format,
    normalize_row,
    required_fields,
)
from posttrain.pipeline.data.images import rows_relative_to
from posttrain.pipeline.data.readers import SUPPORTED_SUFFIXES, read_rows
from posttrain.util import short_error

__all__ = [
    "DataRequest",
    "FormatName",
    "LoadedData",
    "default_train_on_what",
    "detect_format",
    "load_data",
    "normalize_row",
    "read_rows",
]

SHUFFLE_BUFFER = 10_000
EVAL_FRACTION = 0.1
# A missing name with one of these endings was meant as a file, not a Hub dataset.
_FILE_LIKE_SUFFIXES = (*SUPPORTED_SUFFIXES, ".tsv", ".txt", ".gz", ".zst", ".xlsx", ".arrow")


@dataclass(frozen=True)
class LoadedData:
    format: FormatName
    train: list[dict]
    eval: list[dict]
    source: str
    eval_source: str
    notes: list[str]
    # The datasets given with this one (distillation with several teachers: one per teacher, in order; this
    # one is the first teacher's).
    others: tuple[LoadedData, ...] = ()


@dataclass
class _Part:
    """Validated rows from one source, before train/eval are settled."""

    format: FormatName
    rows: list[dict]
    source: str
    notes: list[str]


# --- validating rows -------------------------------------------------------------------------------


@dataclass
class _Collected:
    format: FormatName
    rows: list[dict]
    more_available: bool


def _collect(rows: Iterable[tuple[str, dict]], limit: int, label: str, probe_more: bool) -> _Collected:
    """Detect the format from the first row, then validate and normalize up to `limit` rows."""
    iterator = iter(rows)
    fmt: FormatName | None = None
    fields: tuple[str, ...] = ()
    first_where = ""
    normalized: list[dict] = []
    for where, row in islice(iterator, limit):
        if fmt is None:
            fmt, first_where = detect_format(row, where), where
            fields = required_fields(row, fmt)
        _check_same_format(row, fmt, fields, where, first_where)
        normalized.append(normalize_row(row, fmt, where))
    if fmt is None:
        raise DataError(f"{label}: no rows found (it is empty)")
    return _Collected(fmt, normalized, probe_more and _has_more(iterator))


def _check_same_format(
    row: dict, fmt: FormatName, fields: tuple[str, ...], where: str, first_where: str
) -> None:
    for field in fields:
        if row.get(field) is None:
            looks_like = ""
            try:
                looks_like = f'; this row looks like "{detect_format(row, where)}"'
            except DataError:
                pass
            raise DataError(
                f'{where}: field "{field}" is missing; {first_where} set the format to "{fmt}" '
                f"and every row must use the same format{looks_like}"
            )


def _has_more(iterator: Iterator[tuple[str, dict]]) -> bool:
    # Rows past the cap are never used, so a broken one there only tells us the source continues.
    try:
        next(iterator)
    except StopIteration:
        return False
    except DataError:
        return True
    return True


def _shape(fmt: FormatName) -> str:
    return "chat" if fmt in CHAT_FORMATS else fmt


# --- local files -----------------------------------------------------------------------------------


def _looks_local(dataset: str) -> bool:
    """A data file. A directory is a Hugging Face dataset repository on disk (a `git clone` of a Hub
    dataset: README.md configs, split files) and is loaded like a Hub name."""
    path = Path(dataset).expanduser()
    if path.is_dir():
        return False
    if path.exists():
        return True
    if dataset.lower().endswith(_FILE_LIKE_SUFFIXES):
        return True
    # Hub names are "name" or "owner/name"; anything else path-like was meant as a file.
    return dataset.startswith(("/", "./", "../", "~", ".\\")) or dataset.count("/") > 1 or "\\" in dataset


def _load_local(path: str, limit: int, role: str) -> _Part:
    # Image rows name their images relative to the data file (images.py); other rows are left as they are.
    collected = _collect(rows_relative_to(read_rows(path), path), limit, path, probe_more=True)
    notes = [f'{path}: format "{collected.format}", {len(collected.rows):,} {role} rows read']
    if collected.more_available:
        notes.append(
            f"{path}: has more than {limit:,} rows; used the first {limit:,} (cap on {role} rows), "
            "the rest was not read"
        )
    return _Part(collected.format, collected.rows, path, notes)


# --- Hugging Face Hub --------------------------------------------------------------------------------


def _hf_label(name: str, config: str | None, split: str, quoted: bool = False) -> str:
    config_part = f" [{config}]" if config else ""
    shown = f'dataset "{name}"' if quoted else name
    return f"{shown}{config_part} split={split}"


def _hf_unreachable(name: str, exc: BaseException) -> DataError:
    return DataError(
        f'dataset "{name}": cannot load from the Hugging Face Hub ({short_error(exc, limit=200, with_type=False)}); '
        "pass a local file or check the name/network"
    )


def _hf_split_names(name: str, config: str | None) -> list[str]:
    import datasets

    try:
        return list(datasets.get_dataset_split_names(name, config))
    except Exception:  # no split listing means we carve eval from train; loading already proved access
        return []


def _stream_rows(dataset: Iterable[dict], where_prefix: str, name: str) -> Iterator[tuple[str, dict]]:
    iterator = iter(dataset)
    index = 0
    while True:
        try:
            row = next(iterator)
        except StopIteration:
            return
        except Exception as exc:  # network and decoding failures surface lazily, mid-stream
            raise _hf_unreachable(name, exc) from exc
        index += 1
        yield f"{where_prefix} row {index}", dict(row)


def _hf_known_size(dataset: Any, split: str) -> int | None:
    try:
        return int(dataset.info.splits[split].num_examples)
    except Exception:  # size metadata is optional on the Hub
        return None


def _load_hf(name: str, config: str | None, split: str, limit: int, seed: int, role: str) -> _Part:
    import datasets

    label = _hf_label(name, config, split)
    where_prefix = _hf_label(name, config, split, quoted=True)
    try:
        # Always stream: some Hub datasets are 100GB+ and we need at most `limit` rows.
        streamed = datasets.load_dataset(name, config, split=split, streaming=True)
    except Exception as exc:  # offline, unknown name, gated, bad config/split: all reported the same way
        raise _hf_unreachable(name, exc) from exc
    shuffled = streamed.shuffle(seed=seed, buffer_size=SHUFFLE_BUFFER)
    collected = _collect(
        _stream_rows(shuffled.take(limit), where_prefix, name), limit, where_prefix, probe_more=False
    )
    notes = [
        f'{label}: format "{collected.format}", streamed {len(collected.rows):,} {role} rows '
        f"(shuffled with buffer {SHUFFLE_BUFFER:,}, seed {seed})"
    ]
    total = _hf_known_size(streamed, split)
    if len(collected.rows) >= limit:
        of_total = f" of {total:,}" if total is not None else ""
        notes.append(f"{label}: capped at {limit:,} {role} rows{of_total}")
    return _Part(collected.format, collected.rows, f"{label} (streamed)", notes)


# --- train / eval --------------------------------------------------------------------------------------


def _capped(rows: list[dict], n_train: int, request: DataRequest) -> list[dict]:
    """A given evaluation set within the document's limit: 10% of the training rows (at least 1), at most
    max_eval_rows; a larger one is sampled with the run's seed, its rows kept in their order."""
    tenth = max(int(n_train * EVAL_FRACTION), 1) if request.for_training else len(rows)
    cap = min(tenth, request.max_eval_rows)
    if len(rows) <= cap:
        return rows
    return [rows[i] for i in sorted(random.Random(request.seed).sample(range(len(rows)), cap))]


def _carve_eval(rows: list[dict], max_eval_rows: int, seed: int) -> tuple[list[dict], list[dict]]:
    n = len(rows)
    size = min(max(int(n * EVAL_FRACTION), 1 if n >= 2 else 0), max_eval_rows)
    picked = random.Random(seed).sample(range(n), size)
    held_out = set(picked)
    return [r for i, r in enumerate(rows) if i not in held_out], [rows[i] for i in picked]


def _load_source(dataset: str, config: str | None, split: str, limit: int, seed: int, role: str) -> _Part:
    if _looks_local(dataset):
        return _load_local(dataset, limit, role)
    return _load_hf(dataset, config, split, limit, seed, role)


def _pick_hub_eval_split(name: str, config: str | None, train_split: str) -> str | None:
    names = _hf_split_names(name, config)
    return next((s for s in ("test", "validation") if s in names and s != train_split), None)


def _explicit_eval(request: DataRequest) -> _Part:
    eval_dataset = request.eval_dataset
    assert eval_dataset is not None
    if _looks_local(eval_dataset):
        return _load_local(eval_dataset, request.max_eval_rows, "eval")
    # The training config names a config of the training dataset, not necessarily of this one.
    eval_config = request.dataset_config if eval_dataset == request.dataset else None
    split = request.eval_split or _pick_hub_eval_split(eval_dataset, eval_config, "") or request.split
    return _load_hf(eval_dataset, eval_config, split, request.max_eval_rows, request.seed, "eval")


def _check_eval_shape(train: _Part, eval_part: _Part) -> None:
    if _shape(train.format) != _shape(eval_part.format):
        raise DataError(
            f'{eval_part.source}: eval rows are in "{eval_part.format}" format, which does not match '
            f'the training format "{train.format}"'
        )


@dataclass(frozen=True)
class DataRequest:
    """Which rows to load: the dataset (a local file or a Hub name) and its held-out rows, within the limits."""

    dataset: str
    dataset_config: str | None = None
    split: str = "train"
    eval_dataset: str | None = None
    eval_split: str | None = None
    max_train_rows: int = 20_000
    max_eval_rows: int = 2_000
    seed: int = 42
    # A given evaluation set is at most a tenth of the training rows (the user's guide); an evaluation that
    # trains nothing (`posttrain eval`) takes it whole, up to max_eval_rows.
    for_training: bool = True


def load_data(request: DataRequest) -> LoadedData:
    """Training rows and eval rows, both validated and normalized; see the module docstring for limits."""
    dataset, dataset_config, split = request.dataset, request.dataset_config, request.split
    eval_dataset, eval_split, seed = request.eval_dataset, request.eval_split, request.seed
    max_train_rows, max_eval_rows = request.max_train_rows, request.max_eval_rows
    is_local = _looks_local(dataset)
    train = _load_source(dataset, dataset_config, split, max_train_rows, seed, "training")
    notes = list(train.notes)
    if is_local and dataset_config:
        notes.append(f"dataset config {dataset_config!r} ignored: {dataset} is a local file")

    eval_part: _Part | None = None
    eval_source = ""
    if eval_dataset:
        eval_part = _explicit_eval(request)
        eval_source = eval_part.source
    elif not is_local:
        hub_split = eval_split or _pick_hub_eval_split(dataset, dataset_config, split)
        if hub_split:
            eval_part = _load_hf(dataset, dataset_config, hub_split, max_eval_rows, seed, "eval")
            eval_source = f"{hub_split} split"
    elif eval_split:
        notes.append(f"eval split {eval_split!r} ignored: {dataset} is a local file")

    if eval_part is not None:
        _check_eval_shape(train, eval_part)
        notes.extend(eval_part.notes)
        eval_rows = _capped(eval_part.rows, len(train.rows), request)
        if len(eval_rows) < len(eval_part.rows):
            notes.append(
                f"eval: {len(eval_rows):,} of the {len(eval_part.rows):,} rows of {eval_source}, drawn with seed "
                f"{seed} (10% of the {len(train.rows):,} training rows, at most {max_eval_rows:,})"
            )
            eval_source = f"{eval_source}: {len(eval_rows):,} rows drawn with seed {seed} (10% of training)"
        return LoadedData(train.format, train.rows, eval_rows, _describe(train, is_local), eval_source, notes)

    if len(train.rows) < 2:
        raise DataError(
            f"{train.source}: only {len(train.rows)} row: at least 2 are needed, one to train on and one to "
            "evaluate (or give eval_dataset=)"
        )
    train_rows, eval_rows = _carve_eval(train.rows, max_eval_rows, seed)
    notes.append(
        f"eval: {len(eval_rows):,} rows held out from the {len(train.rows):,} training rows "
        f"(10%, at most {max_eval_rows:,}, seed {seed}); {len(train_rows):,} left for training"
    )
    eval_source = f"10% of training rows (seed {seed})"
    return LoadedData(train.format, train_rows, eval_rows, _describe(train, is_local), eval_source, notes)


def _describe(part: _Part, is_local: bool) -> str:
    return f"{part.source} (local file)" if is_local else part.source


def default_train_on_what(data: LoadedData) -> str:
    """The cookbook `TrainOnWhat` value the spec recommends for this data.

    Multi-turn chats train on every assistant turn; everything else (single-turn, reasoning traces, rows
    with a system prompt) trains on the last assistant message. System-prompt baking (all_tokens) changes
    what the model learns, so it is only ever chosen explicitly by the user.
    """
    # The cookbook's TrainOnWhat values, as strings: importing its renderers pulls in torch (seconds), and
    # this runs among the checks that must answer fast (config.TrainOnWhatName is pinned to the enum by a test).
    if data.format in CHAT_FORMATS and any(_assistant_turns(row) >= 2 for row in data.train):
        return "all_assistant_messages"
    return "last_assistant_message"


def _assistant_turns(row: dict) -> int:
    return sum(1 for message in row.get("messages", ()) if message.get("role") == "assistant")
