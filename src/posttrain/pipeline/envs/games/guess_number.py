"""`env=game:guess_number`: the cookbook's guess-the-number game
(`tinker_cookbook.recipes.multiplayer_rl.guess_number`).

The player guesses an integer in [0, 1024) and is told "Too low", "Too high" or "Correct", for at most 10 turns;
reward 1 for the correct guess, -1 for a turn it cannot parse. Its `GuessNumberEnv` is used as it is, in training
and evaluation alike. Held-out games use the targets the cookbook's own split keeps for testing (10% of the
numbers, fixed by seed 0), so no evaluation game is ever trained on; which of them are played is fixed by the
run's seed.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import TYPE_CHECKING

from posttrain.pipeline.envs.base import (
    EnvContext,
    Environment,
    Episode,
    ProblemSet,
    n_eval,
    n_train,
    problem_group,
)

if TYPE_CHECKING:
    from tinker_cookbook.renderers import Message
    from tinker_cookbook.rl.types import Env, EnvGroupBuilder

    from posttrain.pipeline.data import LoadedData
    from posttrain.pipeline.envs.base import ProblemSettings
    from posttrain.pipeline.envs.spec import EnvSpec
    from posttrain.pipeline.results import RLExample

# The cookbook's guess_number constants (a test pins them to tinker_cookbook's module).
GUESS_NUMBER_UPPER_BOUND = 1024
GUESS_NUMBER_TRAIN_FRACTION = 0.9
MAX_TURNS = 10


def cookbook_split() -> tuple[list[int], list[int]]:
    """The train and test targets of the cookbook's own split (GuessNumberDatasetBuilder's, seed 0)."""
    rng = random.Random(0)
    numbers = rng.sample(range(0, GUESS_NUMBER_UPPER_BOUND), GUESS_NUMBER_UPPER_BOUND)
    cut = int(GUESS_NUMBER_UPPER_BOUND * GUESS_NUMBER_TRAIN_FRACTION)
    return numbers[:cut], numbers[cut:]


def _game(target: int) -> dict:
    return {
        "question": f"guess the number in [0, {GUESS_NUMBER_UPPER_BOUND})",
        "answer": str(target),
        "target": target,
    }


def _make_env(problem: dict, ctx: EnvContext) -> Env:
    from tinker_cookbook.recipes.multiplayer_rl.guess_number.env import GuessNumberEnv

    return GuessNumberEnv(int(problem["target"]), ctx.renderer)


class GuessNumber(Environment):
    tag = "guess_number"
    score_label = "win rate"
    noun = "games"
    takes_verifier = False

    def problems(self, spec: EnvSpec, cfg: ProblemSettings, data: LoadedData | None) -> ProblemSet:
        train_targets, test_targets = cookbook_split()
        rng = random.Random(cfg.seed)
        train = [_game(rng.choice(train_targets)) for _ in range(n_train(cfg))]
        chosen = random.Random(cfg.seed + 1).sample(test_targets, min(n_eval(cfg), len(test_targets)))
        return ProblemSet(
            train,
            [_game(t) for t in chosen],
            {
                "source": "the cookbook's guess_number game (multiplayer_rl recipe): integers in [0, 1024), 10 turns",
                "eval_source": f"{len(chosen)} held-out targets from the cookbook's test split, "
                f"chosen by seed {cfg.seed + 1}",
                "score": "win rate (the number guessed within 10 turns)",
            },
        )

    def prompt(self, problem: dict, ctx: EnvContext) -> list[Message]:
        from tinker_cookbook.recipes.multiplayer_rl.guess_number.env import SYSTEM_PROMPT

        return [{"role": "system", "content": SYSTEM_PROMPT}]

    def max_turns(self, spec: EnvSpec) -> int:
        return MAX_TURNS

    def make_env(self, problem: dict, ctx: EnvContext) -> Env:
        return _make_env(problem, ctx)

    def group_builder(self, problem: dict, ctx: EnvContext, group_size: int) -> EnvGroupBuilder:
        return problem_group(_make_env, problem, ctx, group_size, self.tag)

    def row(self, index: int, problem: dict, episode: Episode) -> RLExample:
        """Won when a step's reward is 1 (the game's "Correct"); the transcript has every turn."""
        from posttrain.pipeline.results import RLExample

        transitions = episode.trajectory.transitions
        transcript = [
            {"turn": turn, "player": t.logs.get("guess"), "env": t.logs.get("feedback"), "reward": t.reward}
            for turn, t in enumerate(transitions, 1)
        ]
        won = any(t.reward == 1.0 for t in transitions)
        last = str(transcript[-1]["player"]).removeprefix("Guess:").strip() if transcript else ""
        record = RLExample(
            index, problem["question"], str(problem["answer"]), "", last, won, transcript=transcript
        )
        record.completion = "\n".join(str(t["player"]) for t in transcript)
        record.details = {"outcome": "win" if won else "loss"}
        return record

    def score(self, rows: Sequence[RLExample]) -> float:
        return sum(1 for r in rows if r.correct) / len(rows) if rows else float("nan")
