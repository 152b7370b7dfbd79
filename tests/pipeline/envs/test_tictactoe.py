"""Tic-tac-toe against a fixed opponent (`env=game:tic_tac_toe`), without an engine: the env is played with
scripted answers (the tokens a model would sample), so rewards, outcomes, the opponent's determinism, illegal
moves and the held-out games can be checked exactly. The end-to-end run is in test_rl_envs_e2e.py."""

from __future__ import annotations

import asyncio

import pytest
from tinker_cookbook import renderers
from tinker_cookbook.tokenizer_utils import get_tokenizer

from posttrain.errors import ConfigError
from posttrain.pipeline.envs.base import EnvContext
from posttrain.pipeline.envs.games import tictactoe
from posttrain.pipeline.envs.spec import EnvSpec
from posttrain.pipeline.results.rows import RLExample
from posttrain.pipeline.results.summary import game_outcome_rates
from posttrain.pipeline.scoring.scorer import Scorer
from posttrain.pipeline.settings import parse_train_args


@pytest.fixture(scope="module")
def renderer(tiny_model: str) -> renderers.Renderer:
    return renderers.get_renderer("role_colon", tokenizer=get_tokenizer(tiny_model))


def _game(player_id: int = 0, opponent: str = "random", seed: int = 7) -> dict:
    return {"player_id": player_id, "opponent": opponent, "opponent_seed": seed}


def _play(
    renderer: renderers.Renderer, game: dict, answers: list[str] | None = None
) -> tictactoe.TicTacToeEnv:
    """Play `answers` in turn, or (None) always the lowest free cell, until the game ends."""

    async def run() -> tictactoe.TicTacToeEnv:
        env = tictactoe.make_env(game, EnvContext(EnvSpec("game", "tic_tac_toe"), renderer, Scorer()))
        await env.initial_observation()
        for turn in range(tictactoe.MAX_MODEL_TURNS if answers is None else len(answers)):
            answer = answers[turn] if answers is not None else f"[{env.board().index('')}]"
            step = await env.step(renderer.tokenizer.encode(answer, add_special_tokens=False))
            if step.episode_done:
                break
        return env

    return asyncio.run(run())


def test_the_opponent_is_deterministic_per_seed(renderer):
    def replies(seed: int) -> list:
        env = _play(renderer, _game(1, seed=seed))  # the model is X: the opponent opens
        return [env.turns[0]["board"]] + [t["opponent_move"] for t in env.turns]

    assert replies(11) == replies(11)
    assert len({tuple(replies(s)) for s in range(8)}) > 1  # the seed matters


def test_win_draw_and_loss_rewards_and_the_transcript(renderer):
    outcomes = set()
    for seed in range(12):
        env = _play(renderer, _game(seed % 2, "random", seed))
        outcome = env.outcome()
        assert outcome in ("win", "draw", "loss") and not env.illegal()
        outcomes.add(outcome)
        assert env.compute_reward() == tictactoe.REWARDS[outcome] == env.turns[-1]["reward"]
        assert env.turns[-1]["env"].endswith(outcome)
        assert all(t["reward"] == 0.0 for t in env.turns[:-1])  # the reward comes at the end of the game
        assert [t["turn"] for t in env.turns] == list(range(1, len(env.turns) + 1))
    # (the fourth outcome, the other seat's illegal move, exists only in self-play: a draw's reward)
    assert tictactoe.REWARDS == {"win": 1.0, "draw": 0.5, "loss": 0.0, tictactoe.OTHER_ILLEGAL: 0.5}
    assert len(outcomes) >= 2
    first = env.turns[0]
    assert set(first) == {
        "turn",
        "seat",
        "player",
        "env",
        "reward",
        "board",
        "move",
        "opponent_move",
        "board_after",
    }
    assert first["seat"] == env.symbol
    assert first["board"].count("|") == 6 and first["player"].startswith("[")


def test_the_blocker_wins_when_it_can_else_blocks():
    import textarena as ta

    shared = ta.make(env_id=tictactoe.GAME_ID)
    shared.reset(num_players=2, seed=0)
    for move in ("[0]", "[4]", "[1]", "[5]", "[8]"):  # O: 0 1 8 (threatens 2); X: 4 5 (wins at 3)
        shared.step(move)
    _, observation = shared.get_observation()
    blocker = tictactoe.make_opponent("blocker", seed=0)
    reply = asyncio.run(blocker([{"role": "user", "content": observation}]))
    assert reply["content"] == "[3]"
    shared.reset(num_players=2, seed=0)
    for move in ("[0]", "[4]", "[1]"):  # O threatens 2, X has no line to complete
        shared.step(move)
    _, observation = shared.get_observation()
    assert asyncio.run(blocker([{"role": "user", "content": observation}]))["content"] == "[2]"


def test_the_optimal_opponent_is_never_beaten(renderer):
    for player_id in (0, 1):
        env = _play(renderer, _game(player_id, "optimal", 0))
        assert env.outcome() in ("draw", "loss")


@pytest.mark.parametrize(
    ("answers", "why"),
    [
        (["[4]", "[4]"], "cell 4 is already taken"),
        (["I would rather not play"], "no [cell] in the answer"),
        (["[4]", "Let me take 4 again"], "cell 4 is already taken"),
        (["[9]"], "cell 9 is not 0-8"),
    ],
)
def test_an_illegal_move_ends_the_game_as_a_loss_with_the_penalty(renderer, answers, why):
    env = _play(renderer, _game(0, "random", 5), answers)
    assert env.coordinator.game_done and env.illegal() and env.outcome() == "loss"
    legal = len(answers) - 1  # each legal move before the illegal one earns 0.1 back
    assert env.compute_reward() == pytest.approx(tictactoe.ILLEGAL_MOVE_REWARD + 0.1 * legal)
    assert tictactoe.ILLEGAL_MOVE_REWARD == -0.5 and env.turns[-1]["env"] == f"illegal move ({why}): loss"
    assert env.turns[-1]["reward"] == env.compute_reward() and env.turns[-1]["move"] is None


def test_the_move_is_the_first_bracketed_cell_else_the_first_number(renderer):
    assert [
        tictactoe.parse_move(t) for t in ("[4]", "I say 3, no: [5]", "4\n\nA fine move", "cell 1.5", "x")
    ] == [4, 5, 4, None, None]
    env = _play(renderer, _game(0, "random", 5), ["4\n\nThe answer is: "])
    assert env.turns[0]["move"] == 4 and not env.illegal()


def test_held_out_games_are_fixed_by_the_seed_alternate_seats_and_are_never_trained_on():
    problems = tictactoe.games(200, 50, seed=3, opponent="blocker")
    assert problems.eval == tictactoe.games(10, 50, seed=3, opponent="blocker").eval
    assert {g["opponent_seed"] for g in problems.train}.isdisjoint(g["opponent_seed"] for g in problems.eval)
    assert [g["player_id"] for g in problems.eval[:4]] == [0, 1, 0, 1]
    assert all(g["opponent"] == "blocker" and g["answer"] == "win" for g in problems.eval)
    assert problems.eval != tictactoe.games(10, 50, seed=4, opponent="random").eval


def test_outcome_rates_for_the_summary():
    rows = [
        RLExample(0, "q", "win", "", "", True, details={"outcome": "win", "illegal_move": False}),
        RLExample(1, "q", "win", "", "", False, details={"outcome": "draw", "illegal_move": False}),
        RLExample(2, "q", "win", "", "", False, details={"outcome": "loss", "illegal_move": True}),
        RLExample(3, "q", "win", "", "", False, details={"outcome": "loss", "illegal_move": False}),
        RLExample(4, "q", "win", "", "", None, error="the engine went away"),  # not played: left out
    ]
    assert game_outcome_rates(rows, "baseline") == {
        "baseline_win_rate": 0.25,
        "baseline_draw_rate": 0.25,
        "baseline_loss_rate": 0.5,
        "baseline_illegal_move_rate": 0.25,
    }
    assert game_outcome_rates([RLExample(0, "q", "4", "4", "4", True)], "trained") == {}  # not a game


def test_game_opponent_is_checked_and_only_for_tic_tac_toe():
    from posttrain.pipeline.settings import validate

    validate(parse_train_args(["env=game:tic_tac_toe", "game_opponent=blocker"]))
    with pytest.raises(ConfigError, match="game_opponent is only used by env=game:tic_tac_toe"):
        validate(parse_train_args(["env=game:guess_number", "game_opponent=random"]))
    with pytest.raises(ConfigError, match="game_opponent"):
        validate(parse_train_args(["env=game:tic_tac_toe", "game_opponent=grandmaster"]))
