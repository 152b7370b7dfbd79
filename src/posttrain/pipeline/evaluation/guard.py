"""The guard set: did training make the model worse at what it was not trained on?

By default, general chat: the NLL of the last assistant reply of everyday conversations that ship with the
cookbook (`tinker_cookbook/example_data/conversations.jsonl`: short questions and answers on geography, science,
cooking, maths tutoring...), the first GUARD_ROWS the run does not train on. `guard_dataset=FILE` names the user's
own (`{"messages": [...]}` rows), `guard=false` turns it off. Base and trained model are scored the same way, with
the run's renderer, as the cookbook's NLL evaluator does (`evaluation/nll.py`); `results/guard.py` judges the
paired difference. It is small on purpose: 64 short conversations cost a few seconds per model.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from importlib import resources
from typing import TYPE_CHECKING

from posttrain.config.run import RunSettings
from posttrain.errors import DataError
from posttrain.pipeline.data.readers import read_rows

if TYPE_CHECKING:
    import tinker
    from tinker_cookbook import renderers

    from posttrain.pipeline.results import SFTExample

GUARD_ROWS = 64
# Tokens per guard conversation at most: the shipped ones are far shorter; a user's longer ones are cut.
MAX_LENGTH = 1024
NAME = "general chat NLL"


@dataclass(frozen=True)
class GuardSet:
    name: str  # what the check is called in the verdict ("general chat NLL")
    source: str  # where its rows come from, in words
    rows: list[dict]


def shipped_conversations() -> str:
    return str(resources.files("tinker_cookbook") / "example_data" / "conversations.jsonl")


def load_guard(cfg: RunSettings, training_rows: list[dict]) -> GuardSet | None:
    """The run's guard set (None with guard=false): up to GUARD_ROWS conversations that are not training rows."""
    if not cfg.guard:
        return None
    path = cfg.guard_dataset or shipped_conversations()
    trained_on = {_key(r["messages"]) for r in training_rows if isinstance(r.get("messages"), list)}
    rows, left_out = [], 0
    for where, row in read_rows(path):
        messages = _messages(row, where, checked=cfg.guard_dataset is not None)
        if _key(messages) in trained_on:
            left_out += 1  # scoring what it trained on would measure memory, not a side effect
            continue
        rows.append({"messages": messages})
        if len(rows) == GUARD_ROWS:
            break
    if not rows:
        raise DataError(f"guard_dataset={path}: no conversation left to score (every one is a training row)")
    what = path if cfg.guard_dataset else "tinker-cookbook example_data/conversations.jsonl"
    also = f"; {left_out} left out (also training rows)" if left_out else ""
    return GuardSet(
        NAME if cfg.guard_dataset is None else "guard set NLL",
        f"{what}: {len(rows)} conversations{also}",
        rows,
    )


def _messages(row: dict, where: str, checked: bool) -> list[dict]:
    messages = row.get("messages")
    ok = isinstance(messages, list) and all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
        for m in messages
    )
    if not ok or not any(m["role"] == "assistant" for m in messages):
        detail = 'needs "messages": a list of {role, content} with an assistant reply'
        raise DataError(f"guard_dataset: {where}: {detail}" if checked else f"{where}: {detail}")
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def _key(messages: list[dict]) -> str:
    text = json.dumps([(m.get("role"), m.get("content")) for m in messages], ensure_ascii=False)
    return hashlib.sha256(text.encode()).hexdigest()


async def evaluate_guard(
    client: tinker.SamplingClient, guard: GuardSet, renderer: renderers.Renderer, concurrency: int, label: str
) -> list[SFTExample]:
    """Per-conversation NLL of its last assistant reply under `client` (rows in the SFT schema)."""
    from tinker_cookbook.renderers import TrainOnWhat
    from tinker_cookbook.supervised.data import conversation_to_datum

    from posttrain.pipeline.evaluation.nll import evaluate_nll

    datums = [
        conversation_to_datum(r["messages"], renderer, MAX_LENGTH, TrainOnWhat.LAST_ASSISTANT_MESSAGE)
        for r in guard.rows
    ]
    rows, _ = await evaluate_nll(client, datums, guard.rows, concurrency, f"guard ({label})")
    return rows
