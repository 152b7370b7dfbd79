"""The prompts a teacher answers: from any dataset (its reference answers dropped) or an RL environment's problems,
one `Share` per teacher (each teacher has its own dataset)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from posttrain.errors import DataError
from posttrain.pipeline.data import LoadedData
from posttrain.pipeline.data.formats import CHAT_FORMATS
from posttrain.pipeline.envs.base import ProblemSettings, prompt_messages

Messages = list[dict[str, str]]


class PromptSettings(ProblemSettings, Protocol):
    """The settings prompts are made from: an environment's problems when `env=` is set."""

    env: str | None


@dataclass(frozen=True)
class Prompts:
    train: list[Messages]
    eval: list[Messages]
    source: dict[str, Any]
    # The held-out prompts that can be graded (an env='s problems, rows with an `answer`), as RL problems.
    eval_problems: list[dict] = field(default_factory=list)


@dataclass(frozen=True)
class Share:
    """One teacher and the prompts it teaches on: its own dataset's training and held-out prompts."""

    teacher_model: str
    prompts: Prompts


def pooled(shares: Sequence[Share]) -> Prompts:
    """All teachers' prompts in one list, in teacher order (one teacher: its own)."""
    if len(shares) == 1:
        return shares[0].prompts
    return Prompts(
        [p for s in shares for p in s.prompts.train],
        [p for s in shares for p in s.prompts.eval],
        {
            "source": " + ".join(str(s.prompts.source.get("source", "env")) for s in shares),
            "sources": [s.prompts.source for s in shares],
        },
    )


def split_evenly(total: int, parts: int) -> list[int]:
    """`total` as `parts` near-equal integers, the larger ones first (9 over 2: [5, 4])."""
    return [total // parts + (k < total % parts) for k in range(parts)]


def prompt_of(row: dict, fmt: str) -> Messages:
    """The conversation a teacher answers: a row's messages before its final answer (the answer is dropped)."""
    if fmt in CHAT_FORMATS:
        messages = row["messages"]
        last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
        return messages[:last]
    if fmt == "preference":
        return row["prompt"]
    return [{"role": "user", "content": row["question"]}]


def load_prompts(cfg: PromptSettings, data: LoadedData | None, task: str) -> Prompts:
    """Prompts from any dataset (its reference answers are ignored) or from an RL environment (env=)."""
    if data is None:  # env= given: the environment's problems, with the RL prompt
        from posttrain.pipeline.envs import registry

        spec = registry.check(cfg.env or "math")
        problems = registry.environment(spec).problems(spec, cfg, None)
        return Prompts(
            [prompt_messages(p) for p in problems.train],
            [prompt_messages(p) for p in problems.eval],
            {**problems.info, "env": cfg.env},
            [p for p in problems.eval if "question" in p and "answer" in p],
        )
    train = [prompt_of(r, data.format) for r in data.train]
    held_out = [prompt_of(r, data.format) for r in data.eval]
    if not train or not held_out or not all(train + held_out):
        raise DataError(
            f"{data.source}: task={task} needs prompts to train on and held-out prompts to evaluate"
        )
    return Prompts(
        train,
        held_out,
        {"source": data.source, "format": data.format, "eval_source": data.eval_source},
        [g for r, p in zip(data.eval, held_out, strict=True) if (g := gradable(r, p))],
    )


def gradable(row: dict, prompt: Messages) -> dict | None:
    """A single-question row with an `answer` (e.g. pairs made from a verifiable task) as an RL problem whose
    prompt is exactly the held-out prompt (no answer instruction added); None otherwise."""
    answer = row.get("answer")
    if answer is None or str(answer).strip() == "" or len(prompt) != 1 or prompt[0]["role"] != "user":
        return None
    return {"question": prompt[0]["content"], "answer": str(answer), "instruction": ""}


def prompt_text(messages: Messages) -> str:
    return "\n\n".join(f"{m['role']}: {m['content']}" for m in messages)
