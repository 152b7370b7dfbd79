"""What every evaluation shares: bounded concurrency with a progress bar, sampling settings, and the rule that an
evaluation in which every example failed measured nothing (`EvaluationFailed`).

A failed example is recorded with its error and does not stop the evaluation (the user guide's parallel
evaluation: one failure must not crash the batch).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from tqdm.asyncio import tqdm_asyncio

from posttrain.errors import UserError
from posttrain.pipeline.console import CONSOLE

T = TypeVar("T")


class EvaluationFailed(UserError):
    """Every example of an evaluation failed (the service refused them all): there is no score to report."""


def check_some_succeeded(records: Sequence[Any], desc: str) -> None:
    errors = [r.error for r in records if r.error]
    if records and len(errors) == len(records):
        raise EvaluationFailed(f"evaluation of the {desc} failed on all {len(records)} examples: {errors[0]}")


@dataclass(frozen=True)
class SamplingSettings:
    max_tokens: int
    temperature: float
    seed: int
    concurrency: int = 64  # requests at a time (`eval_concurrency`)


async def bounded_gather(
    items: Sequence[Any], work: Callable[[int, Any], Awaitable[T]], concurrency: int, desc: str
) -> list[T]:
    semaphore = asyncio.Semaphore(concurrency)

    async def one(i: int, item: Any) -> T:
        async with semaphore:
            return await work(i, item)

    tasks = [one(i, x) for i, x in enumerate(items)]
    return list(await tqdm_asyncio.gather(*tasks, desc=desc, leave=False, file=CONSOLE.stream))
