"""One score for a (problem, completion) pair, used by the RL reward and by the evaluation alike (so the two
cannot disagree): the user's verifier when `reward_fn=` is set, else the grader the problem names.

A problem's `"grader"` is looked up in `GRADERS`, here and nowhere else: "math" (the cookbook's sympy grader),
"exact_match" (after SQuAD's normalisation), "f1" (token F1 as the reward, exact match as `correct`),
"reasoning_gym" (the task's own scorer), "code" (tests in the sandbox, the fraction passed), "code_stdio" (a
whole program run on each test's stdin, the fraction of outputs matched) and "humaneval" (its `check` in the
sandbox). A new grader is one entry.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from posttrain.pipeline.scoring import code, code_stdio, grading
from posttrain.pipeline.scoring.verifiers import UserVerifier

# Sandboxes run at once: each is a process or two; more than the cores only adds contention.
SANDBOX_PARALLELISM = 4


@dataclass
class Scored:
    reward: float  # in [0, 1]
    extracted: str
    correct: bool  # full credit
    details: dict[str, Any] = field(default_factory=dict)
    verifier_error: str | None = None


def _answer(check: Callable[[dict, str], bool]) -> Callable[[dict, str], Awaitable[Scored]]:
    """A grader of a final answer: extracted from the completion, then checked."""

    async def score(problem: dict, completion: str) -> Scored:
        extracted = grading.extract_answer(completion)
        ok = bool(check(problem, extracted))
        return Scored(float(ok), extracted, ok)

    return score


async def _token_f1(problem: dict, completion: str) -> Scored:
    """Factual QA: the reward is the token F1 of the final answer; `correct` is its exact match."""
    extracted = grading.extract_answer(completion)
    f1 = grading.token_f1(extracted, str(problem["answer"])) if extracted.strip() else 0.0
    return Scored(f1, extracted, grading.grade_text(problem, extracted), {"f1": round(f1, 4)})


def _sandboxed(run: Callable[[dict, str], code.CodeResult]) -> Callable[[dict, str], Awaitable[Scored]]:
    async def score(problem: dict, completion: str) -> Scored:
        result = await asyncio.to_thread(run, problem, completion)
        details: dict[str, Any] = {"tests_passed": result.passed, "tests_total": result.total}
        if result.note:
            details["failure"] = result.note
        if result.per_test:
            details["tests"] = list(result.per_test)
        return Scored(result.reward, result.code, result.passed == result.total, details)

    return score


@dataclass(frozen=True)
class Grader:
    score: Callable[[dict, str], Awaitable[Scored]]
    # What a user verifier's row shows as the extracted answer for such problems.
    extract: Callable[[dict, str], str]
    sandboxed: bool = False  # runs code: at most SANDBOX_PARALLELISM at a time


def _final_answer(problem: dict, completion: str) -> str:
    return grading.extract_answer(completion)


def _code(problem: dict, completion: str) -> str:
    return code.extract_code(completion, problem.get("entry_point"))


def _program(problem: dict, completion: str) -> str:
    return code_stdio.extract_program(completion)


GRADERS: dict[str, Grader] = {
    "math": Grader(_answer(grading.grade_math), _final_answer),
    "exact_match": Grader(_answer(grading.grade_text), _final_answer),
    "f1": Grader(_token_f1, _final_answer),
    "reasoning_gym": Grader(_answer(grading.grade_reasoning_gym), _final_answer),
    "code": Grader(_sandboxed(code.grade), _code, sandboxed=True),
    "humaneval": Grader(_sandboxed(code.grade_humaneval), _code, sandboxed=True),
    "code_stdio": Grader(_sandboxed(code_stdio.grade), _program, sandboxed=True),
}


class Scorer:
    def __init__(self, verifier: UserVerifier | None = None):
        self.verifier = verifier
        self._sandboxes: asyncio.Semaphore | None = None  # made in the event loop that uses it

    async def score(self, problem: dict, completion: str, phase: str) -> Scored:
        grader = GRADERS[problem.get("grader", "math")]
        if self.verifier is not None:
            row = problem.get("row") or {k: v for k, v in problem.items() if k != "grader"}
            reward, error = await self.verifier.score(row, completion, phase)
            return Scored(reward, grader.extract(problem, completion), reward >= 1.0, verifier_error=error)
        if not grader.sandboxed:
            return await grader.score(problem, completion)
        if self._sandboxes is None:
            self._sandboxes = asyncio.Semaphore(SANDBOX_PARALLELISM)
        async with self._sandboxes:
            return await grader.score(problem, completion)


def make_scorer(reward_fn: str | None, errors_file: str | None, timeout: float) -> Scorer:
    """The user's verifier when `reward_fn=` names one (its errors logged to `errors_file`), else the graders."""
    from pathlib import Path

    if not reward_fn:
        return Scorer()
    return Scorer(UserVerifier(reward_fn, Path(errors_file) if errors_file else None, timeout))
