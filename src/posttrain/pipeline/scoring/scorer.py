"""One score for a (problem, completion) pair, used by the RL reward and by the evaluation alike (so the two
cannot disagree): a user verifier when `reward_fn=` is set, else the problem's grader: "math" and
"reasoning_gym:TASK" (`grading`, 0 or 1), "code" and "humaneval" (tests in the sandbox, `code_tasks`).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

from posttrain.pipeline.envs import code as code_tasks
from posttrain.pipeline.scoring.grading import extract_answer, grade
from posttrain.pipeline.scoring.verifiers import UserVerifier

CODE_GRADERS = ("code", "humaneval")
# Sandboxes run at once: each is a process or two; more than the cores only adds contention.
SANDBOX_PARALLELISM = 4


@dataclass
class Scored:
    reward: float  # in [0, 1]
    extracted: str
    correct: bool  # full credit
    details: dict[str, Any] = field(default_factory=dict)
    verifier_error: str | None = None


class Scorer:
    def __init__(self, verifier: UserVerifier | None = None):
        self.verifier = verifier
        self._sandboxes: asyncio.Semaphore | None = None

    async def score(self, problem: dict, completion: str, phase: str) -> Scored:
        is_code = problem.get("grader") in CODE_GRADERS
        if self.verifier is not None:
            row = problem.get("row") or {k: v for k, v in problem.items() if k != "grader"}
            reward, error = await self.verifier.score(row, completion, phase)
            extracted = (
                code_tasks.extract_code(completion, problem.get("entry_point"))
                if is_code
                else extract_answer(completion)
            )
            return Scored(reward, extracted, reward >= 1.0, verifier_error=error)
        if is_code:
            if self._sandboxes is None:
                self._sandboxes = asyncio.Semaphore(SANDBOX_PARALLELISM)
            async with self._sandboxes:
                result = await asyncio.to_thread(code_tasks.grade, problem, completion)
            details: dict[str, Any] = {"tests_passed": result.passed, "tests_total": result.total}
            if result.note:
                details["failure"] = result.note
            return Scored(result.reward, result.code, result.passed == result.total, details)
        extracted = extract_answer(completion)
        ok = bool(grade(problem, extracted))
        return Scored(float(ok), extracted, ok)
