"""Multi-turn games (`env=game:NAME`): which games are played in training and which are held out.

guess_number is the cookbook's game (`tinker_cookbook.recipes.multiplayer_rl.guess_number`): the player guesses
an integer in [0, 1024) and is told "Too low", "Too high" or "Correct", for at most 10 turns; reward 1 for the
correct guess, -1 for a turn it cannot parse. Its env classes are used as they are (`rl_envs`, `evaluation`).
Held-out games use the targets the cookbook's own split keeps for testing (10% of the numbers, fixed by seed 0),
so no evaluation game is ever trained on; which of them are played is fixed by the run's seed.

This module imports nothing heavy: it runs in the checks before a run.
"""

from __future__ import annotations

import random

from posttrain.errors import ConfigError
from posttrain.pipeline.problems import ProblemSet

# The cookbook's guess_number constants (a test pins them to tinker_cookbook's module).
GUESS_NUMBER_UPPER_BOUND = 1024
GUESS_NUMBER_TRAIN_FRACTION = 0.9
GAMES = ("guess_number",)


def _cookbook_split() -> tuple[list[int], list[int]]:
    # The same split as GuessNumberDatasetBuilder._get_train_and_test_numbers.
    rng = random.Random(0)
    numbers = rng.sample(range(0, GUESS_NUMBER_UPPER_BOUND), GUESS_NUMBER_UPPER_BOUND)
    cut = int(GUESS_NUMBER_UPPER_BOUND * GUESS_NUMBER_TRAIN_FRACTION)
    return numbers[:cut], numbers[cut:]


def _game(target: int) -> dict:
    return {
        "question": f"guess the number in [0, {GUESS_NUMBER_UPPER_BOUND})",
        "answer": str(target),
        "grader": "game:guess_number",
        "target": target,
    }


def game_problems(name: str, n_train: int, n_eval: int, seed: int) -> ProblemSet:
    if name not in GAMES:
        raise ConfigError(f"env=game:{name}: no such game; available: {', '.join(GAMES)}")
    train_targets, test_targets = _cookbook_split()
    rng = random.Random(seed)
    train = [_game(rng.choice(train_targets)) for _ in range(n_train)]
    held_out = [
        _game(t) for t in random.Random(seed + 1).sample(test_targets, min(n_eval, len(test_targets)))
    ]
    return ProblemSet(
        train,
        held_out,
        {
            "source": "the cookbook's guess_number game (multiplayer_rl recipe): integers in [0, 1024), 10 turns",
            "eval_source": f"{len(held_out)} held-out targets from the cookbook's test split, chosen by seed {seed + 1}",
            "score": "win rate (the number guessed within 10 turns)",
        },
    )
