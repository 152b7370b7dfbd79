"""Multi-turn games (`env=game:NAME`): which games are played in training and which are held out.

tic_tac_toe (`tictactoe`): textarena's game against a fixed, seeded opponent (`game_opponent`). A game is a
seat (player 0 = O, who moves first, or player 1 = X; alternating, so half the games each) and the seed of the
opponent's random choices. Held-out games use opponent seeds never used in training, fixed by the run's seed.

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
from posttrain.pipeline.envs.registry import ProblemSet

# The cookbook's guess_number constants (a test pins them to tinker_cookbook's module).
GUESS_NUMBER_UPPER_BOUND = 1024
GUESS_NUMBER_TRAIN_FRACTION = 0.9
GAMES = ("guess_number", "tic_tac_toe")
OPPONENTS = ("random", "blocker", "optimal")  # config.GameOpponent
_SEED_SPACE = 2**31


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


def _tic_tac_toe(player_id: int, opponent: str, opponent_seed: int) -> dict:
    symbol = "O (moves first)" if player_id == 0 else "X (moves second)"
    return {
        "question": f"tic-tac-toe as {symbol} against the {opponent} opponent, game seed {opponent_seed}",
        "answer": "win",
        "grader": "game:tic_tac_toe",
        "player_id": player_id,
        "opponent": opponent,
        "opponent_seed": opponent_seed,
    }


def tic_tac_toe_problems(n_train: int, n_eval: int, seed: int, opponent: str) -> ProblemSet:
    train_seeds = random.Random(seed).sample(range(_SEED_SPACE), n_train)
    used = set(train_seeds)
    eval_rng = random.Random(seed + 1)
    eval_seeds: list[int] = []
    while len(eval_seeds) < n_eval:
        s = eval_rng.randrange(_SEED_SPACE)
        if s not in used:
            used.add(s)
            eval_seeds.append(s)
    return ProblemSet(
        [_tic_tac_toe(i % 2, opponent, s) for i, s in enumerate(train_seeds)],
        [_tic_tac_toe(i % 2, opponent, s) for i, s in enumerate(eval_seeds)],
        {
            "source": f"textarena TicTacToe-v0 against the {opponent} opponent (seeded); the model plays O "
            "(first) and X in alternate games",
            "eval_source": f"{n_eval} held-out games (opponent seeds from seed {seed + 1}, none used in training)",
            "score": "win rate; reward win 1, draw 0.5, loss 0, illegal move (ends the game) -0.5 + 0.1 per legal move",
        },
    )


def game_problems(name: str, n_train: int, n_eval: int, seed: int, opponent: str | None = None) -> ProblemSet:
    if name not in GAMES:
        raise ConfigError(f"env=game:{name}: no such game; available: {', '.join(GAMES)}")
    if opponent is not None and name != "tic_tac_toe":
        raise ConfigError(f"game_opponent is only used by env=game:tic_tac_toe, not env=game:{name}")
    if name == "tic_tac_toe":
        return tic_tac_toe_problems(n_train, n_eval, seed, opponent or "random")
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
