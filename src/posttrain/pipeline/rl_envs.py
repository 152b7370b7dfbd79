"""The cookbook RL environment over verifiable-reward problems: one `ProblemEnv` per problem, and the dataset
builder the cookbook's `rl.train` loop calls.

Problems (see `problems` and `grading`) are written to a JSONL file in the run's log directory, so a run can
be reproduced from its logs, and the dataset builder (a `chz` config, like every cookbook builder) only carries
that path.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from functools import partial

import chz
from tinker_cookbook import renderers
from tinker_cookbook.rl.problem_env import ProblemEnv, ProblemGroupBuilder
from tinker_cookbook.rl.types import EnvGroupBuilder, RLDataset, RLDatasetBuilder
from tinker_cookbook.tokenizer_utils import get_tokenizer

from posttrain.pipeline.grading import ANSWER_INSTRUCTION, extract_answer, grade
from posttrain.util import read_jsonl


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
        problems = read_jsonl(self.problems_file)
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
