"""Verifiable-reward problems for RL: answer extraction, grading, and the cookbook Env/Dataset classes over them.

A problem is a dict `{"question", "answer", "grader", ...}` where `grader` is "math" (numeric/string match
after extracting the final answer) or "reasoning_gym:TASK" (the task's own scorer, which needs the entry).
Problems are written to a JSONL file in the run's log directory, so a run can be reproduced from its logs,
and the dataset builder (a `chz` config, like every cookbook builder) only carries that path.
"""

from __future__ import annotations

import json
import math
import random
import re
from collections.abc import Sequence
from functools import cache, partial
from pathlib import Path
from typing import Any

import chz
from tinker_cookbook import renderers
from tinker_cookbook.rl.problem_env import ProblemEnv, ProblemGroupBuilder
from tinker_cookbook.rl.types import EnvGroupBuilder, RLDataset, RLDatasetBuilder
from tinker_cookbook.tokenizer_utils import get_tokenizer

from posttrain.errors import ConfigError
from posttrain.pipeline.data_formats import extract_boxed

ANSWER_INSTRUCTION = "Give only the final answer after ####."
_NUMBER = re.compile(r"-?\d+(?:\.\d+)?(?:/\d+)?")


def extract_answer(completion: str) -> str:
    """The model's final answer: after the last `####`, else the last \\boxed{}, else 'answer is/Answer:', else the last number."""
    if "####" in completion:
        tail = completion.rsplit("####", 1)[1].strip()
        return tail.splitlines()[0].strip() if tail else ""
    boxed = extract_boxed(completion)
    if boxed:
        return boxed.strip()
    match = re.search(r"answer(?: is)?\s*[:=]?\s*([^\n]+)", completion, flags=re.IGNORECASE)
    if match:
        return match.group(1).strip().rstrip(".")
    numbers = _NUMBER.findall(completion.replace(",", ""))
    return (
        numbers[-1] if numbers else completion.strip().splitlines()[-1].strip() if completion.strip() else ""
    )


def _as_number(text: str) -> float | None:
    cleaned = text.replace(",", "").replace("$", "").strip().rstrip(".")
    try:
        if "/" in cleaned:
            num, den = cleaned.split("/", 1)
            return float(num) / float(den)
        return float(cleaned)
    except (ValueError, ZeroDivisionError):
        numbers = _NUMBER.findall(cleaned)
        if len(numbers) == 1 and cleaned.startswith(numbers[0]):
            return _as_number(numbers[0])
        return None


def math_equal(extracted: str, truth: str) -> bool:
    a, b = _as_number(extracted), _as_number(truth)
    if a is not None and b is not None:
        return math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-9)
    norm = lambda s: re.sub(r"\s+", " ", s.strip().strip(".").lower())  # noqa: E731
    return bool(extracted) and norm(extracted) == norm(truth)


@cache
def _rg_scorer(task: str) -> Any:
    import reasoning_gym

    return reasoning_gym.get_score_answer_fn(task)


def grade(problem: dict, extracted: str) -> bool:
    grader = problem.get("grader", "math")
    if grader.startswith("reasoning_gym:"):
        scorer = _rg_scorer(grader.split(":", 1)[1])
        return float(scorer(extracted, problem["entry"])) >= 1.0
    return math_equal(extracted, str(problem["answer"]))


def parse_reasoning_gym_env(spec: str) -> tuple[str, dict[str, Any]]:
    """`TASK` or `TASK:key=value,key=value` (values parsed as JSON when they can be: numbers, lists, booleans)."""
    task, _, options = spec.partition(":")
    kwargs: dict[str, Any] = {}
    for item in filter(None, (o.strip() for o in options.split(","))):
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"env=reasoning_gym:{spec}: options must be key=value, got {item!r}")
        try:
            kwargs[key.strip()] = json.loads(value)
        except ValueError:
            kwargs[key.strip()] = value
        if isinstance(kwargs[key.strip()], list):
            kwargs[key.strip()] = tuple(kwargs[key.strip()])
    return task.strip(), kwargs


def reasoning_gym_problems(spec: str, n: int, seed: int) -> list[dict]:
    import reasoning_gym

    task, options = parse_reasoning_gym_env(spec)
    try:
        dataset = reasoning_gym.create_dataset(task, size=n, seed=seed, **options)
    except Exception as exc:  # noqa: BLE001 - unknown task names raise various errors
        raise ConfigError(
            f"env=reasoning_gym:{task}: cannot create this reasoning-gym task ({exc})"
        ) from None
    problems = []
    for entry in dataset:
        entry = json.loads(json.dumps(entry, default=str))  # JSON-safe, since problems are written to disk
        problems.append(
            {
                "question": entry["question"],
                "answer": str(entry["answer"]),
                "grader": f"reasoning_gym:{task}",
                "entry": entry,
            }
        )
    return problems


def arithmetic_problems(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        x, y = rng.randint(0, 100), rng.randint(0, 100)
        out.append({"question": f"What is {x} + {y}?", "answer": str(x + y), "grader": "math"})
    return out


def qa_problems(rows: list[dict]) -> list[dict]:
    return [
        {"question": r["question"], "answer": r.get("final_answer") or r["answer"], "grader": "math"}
        for r in rows
    ]


def prompt_messages(problem: dict, instruction: str = ANSWER_INSTRUCTION) -> list[renderers.Message]:
    text = problem["question"].rstrip()
    return [{"role": "user", "content": f"{text}\n{instruction}" if instruction else text}]


class QAEnv(ProblemEnv):
    """One problem; reward 1 for a correct final answer, minus a small penalty for a malformed response."""

    def __init__(
        self, problem: dict, renderer: renderers.Renderer, instruction: str, format_coef: float = 0.1
    ):
        super().__init__(renderer, convo_prefix=None, format_coef=format_coef)
        self.problem = problem
        self.instruction = instruction

    def get_question(self) -> str:
        return prompt_messages(self.problem, self.instruction)[0]["content"]

    def check_answer(self, sample_str: str) -> bool:
        return grade(self.problem, extract_answer(sample_str))

    def check_format(self, sample_str: str) -> bool:
        return bool(sample_str.strip())

    def get_reference_answer(self) -> str:
        return str(self.problem["answer"])


class ProblemDataset(RLDataset):
    def __init__(
        self,
        problems: list[dict],
        renderer: renderers.Renderer,
        groups_per_batch: int,
        group_size: int,
        instruction: str,
        n_batches: int,
        seed: int,
    ):
        self.problems = problems
        self.renderer = renderer
        self.groups_per_batch = groups_per_batch
        self.group_size = group_size
        self.instruction = instruction
        self.n_batches = n_batches
        self.seed = seed

    def get_batch(self, index: int) -> Sequence[EnvGroupBuilder]:
        # Walk the problems in a seeded order, epoch after epoch, so batch i is the same on resume.
        per_epoch = max(1, len(self.problems) // self.groups_per_batch)
        epoch, offset = divmod(index, per_epoch)
        order = list(range(len(self.problems)))
        random.Random(self.seed + epoch).shuffle(order)
        start = offset * self.groups_per_batch
        chosen = [order[(start + k) % len(order)] for k in range(self.groups_per_batch)]
        return [
            ProblemGroupBuilder(
                env_thunk=partial(QAEnv, self.problems[i], self.renderer, self.instruction),
                num_envs=self.group_size,
                dataset_name="train",
            )
            for i in chosen
        ]

    def __len__(self) -> int:
        return self.n_batches


@chz.chz
class ProblemFileBuilder(RLDatasetBuilder):
    problems_file: str
    model_name_for_tokenizer: str
    renderer_name: str
    groups_per_batch: int
    group_size: int
    n_batches: int
    instruction: str = ANSWER_INSTRUCTION
    seed: int = 0

    async def __call__(self) -> tuple[ProblemDataset, None]:
        problems = read_problems(self.problems_file)
        renderer = renderers.get_renderer(
            self.renderer_name, tokenizer=get_tokenizer(self.model_name_for_tokenizer)
        )
        dataset = ProblemDataset(
            problems,
            renderer,
            self.groups_per_batch,
            self.group_size,
            self.instruction,
            self.n_batches,
            self.seed,
        )
        return dataset, None


def write_problems(path: Path, problems: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for p in problems:
            f.write(json.dumps(p) + "\n")


def read_problems(path: str | Path) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]
