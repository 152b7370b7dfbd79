"""Tic-tac-toe against a fixed opponent (`env=game:tic_tac_toe`, `game_opponent=random|blocker|optimal`), or
against itself (`game_opponent=self`).

A game is a seat (player 0 = O, who moves first, or player 1 = X; alternating, so half the games each) and the
seed of the opponent's random choices. Held-out games use opponent seeds never used in training, fixed by the
run's seed.

Reused from the cookbook's text_arena recipe (`tinker_cookbook.recipes.multiplayer_rl.text_arena`): its
`TwoPlayerCoordinator` (turn-taking over one textarena game; subclassed only to read the model's move) and
`TwoPlayerEnv` in its non-self-play mode (the
opponent is a `MessageCompleter` that moves inside the model's `step`), and its minimax `OptimalOpponent`. The
game itself is textarena's `TicTacToe-v0` (rules, move parsing, win/draw detection). Ours, because the recipe is
self-play and its fixed opponents are not seeded: seeded opponents (`random`, `blocker`), one game per group
(every rollout of a group plays the same seat against the same opponent seed, so advantages compare like with
like), the reward, a short prompt, and per-turn logs for the transcripts.

Self-play (`game_opponent=self`) is the recipe's own mode: the policy plays both seats of one textarena game (two
envs sharing a coordinator, `SelfPlayGames`), and both seats' turns are trajectories of the same RL group, so a
group of `group_size` rollouts is `group_size / 2` games. A seat whose opponent seat moved illegally gets a draw's
reward (the recipe gives it 0, its draw). Held-out games are still played against the random opponent: a score
against itself says nothing about improvement.

Player 0 is O and moves first (textarena's convention); the model plays O in half the games and X in the other
half. The model's move is the first `[N]` in its answer, else its first number (`parse_move`). Reward at the end
of a game: win 1, draw 0.5, loss 0; an illegal move (no cell in the answer, a cell outside 0-8 or one already
taken) ends the game at once as a loss with a penalty: ILLEGAL_MOVE_REWARD = -0.5, plus LEGAL_MOVE_CREDIT = 0.1
for each legal move the model made before it (so -0.5 to -0.1, always below a legal loss). The credit matters:
the default model's answers are all illegal within a few moves, and without it every rollout of a group would
score the same -0.5, leaving the RL loop no signal to learn from.
(The recipe uses textarena's +1/0/-1 and -2 for an illegal move; ours keeps a game's score in [0, 1], the
scale of every other RL score here.)

The prompt is ours, not textarena's observation (about 200 tokens, growing with the move list): the board, the
free cells and the answer format, about 90 tokens with the chat template, since every turn is a separate
training sequence and a small CPU budget pays for each token.
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import textarena as ta
import tinker
from tinker_cookbook.completers import MessageCompleter, StopCondition
from tinker_cookbook.recipes.multiplayer_rl.text_arena.env import TwoPlayerCoordinator, TwoPlayerEnv
from tinker_cookbook.recipes.multiplayer_rl.text_arena.tictactoe import OptimalOpponent
from tinker_cookbook.renderers import Message, get_text_content
from tinker_cookbook.rl.types import Action, ActionExtra, EnvGroupBuilder, StepResult

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
    from posttrain.pipeline.data import LoadedData
    from posttrain.pipeline.envs.base import ProblemSettings
    from posttrain.pipeline.envs.spec import EnvSpec
    from posttrain.pipeline.results import RLExample

# textarena's game with its "-train" wrappers: the opponent's observation is the rules, the game messages and
# the current board (the recipe's default wrapper repeats every earlier board).
GAME_ID = "TicTacToe-v0-train"
SYMBOLS = ("O", "X")  # by player id
WIN, DRAW, LOSS = "win", "draw", "loss"
OTHER_ILLEGAL = "opponent's illegal move"  # self-play only: the other seat ended the game
REWARDS = {WIN: 1.0, DRAW: 0.5, LOSS: 0.0, OTHER_ILLEGAL: 0.5}
SELF_PLAY_EVAL_OPPONENT = "random"
ILLEGAL_MOVE_REWARD = -0.5
LEGAL_MOVE_CREDIT = 0.1  # per legal move before an illegal one (at most 4: still below a legal loss's 0)
MAX_MODEL_TURNS = 5
_MOVE = re.compile(r"\[\s*(\d+)\s*\]")  # textarena's TicTacToeEnv pattern
_NUMBER = re.compile(r"(?<![\d.])(\d+)(?![\d.])")
_LINES = ((0, 1, 2), (3, 4, 5), (6, 7, 8), (0, 3, 6), (1, 4, 7), (2, 5, 8), (0, 4, 8), (2, 4, 6))


# ---------------------------------------------------------------------------------------------- opponents


def _parse_observation(observation: str) -> tuple[list[str], str]:
    """(9 cells: 'O', 'X' or '', the symbol of the player to move) from a textarena tic-tac-toe observation."""
    section = observation.rsplit("Current Board:", 1)[-1].split("Available Moves:", 1)[0]
    cells = [c.strip() for line in section.splitlines() if "|" in line for c in line.split("|")]
    if len(cells) != 9:
        raise ValueError(f"cannot read the board from the observation: {observation[-300:]!r}")
    board = [c if c in SYMBOLS else "" for c in cells]
    return board, ("O" if "you will be 'O'" in observation else "X")


def _completing(board: list[str], symbol: str) -> list[int]:
    """Free cells that would give `symbol` three in a row."""
    return sorted(
        {
            cell
            for line in _LINES
            for cell in line
            if board[cell] == "" and sum(board[c] == symbol for c in line) == 2
        }
    )


class SeededOpponent(MessageCompleter):
    """`random`: a uniformly random free cell; `blocker`: completes its own line when it can, else blocks the
    model's, else random. Its generator is seeded per game, so the same moves by the model get the same replies."""

    def __init__(self, kind: str, seed: int):
        self.kind = kind
        self.rng = random.Random(seed)

    async def __call__(self, messages: list[Message]) -> Message:
        content = messages[-1]["content"]
        assert isinstance(content, str)
        board, me = _parse_observation(content)
        free = [i for i in range(9) if board[i] == ""]
        choice = None
        if self.kind == "blocker":
            other = "X" if me == "O" else "O"
            choice = next(iter(_completing(board, me) or _completing(board, other)), None)
        if choice is None:
            choice = self.rng.choice(free)
        return {"role": "assistant", "content": f"[{choice}]"}


def make_opponent(kind: str, seed: int) -> MessageCompleter:
    if kind == "optimal":
        return OptimalOpponent()  # deterministic minimax: the model can at best draw
    if kind in ("random", "blocker"):
        return SeededOpponent(kind, seed)
    raise ValueError(f"unknown tic-tac-toe opponent {kind!r}")


# ---------------------------------------------------------------------------------------------- the env


def parse_move(text: str) -> int | None:
    """The model's cell: the first `[N]` in its answer (textarena's rule), else its first number. A small model
    often answers "4" followed by chatter, which textarena reads as no move at all; reading the number gives
    it a foothold (cf. the generated code tasks), and the cell must still be free."""
    found = _MOVE.search(text) or _NUMBER.search(text)
    return int(found.group(1)) if found else None


class ModelMoveCoordinator(TwoPlayerCoordinator):
    """The cookbook's coordinator; the model's answers are turned into `[N]` (`parse_move`) before textarena
    checks them (in self-play, both seats' answers)."""

    def __init__(self, shared_env: ta.Env, model_player_ids: set[int]):
        super().__init__(shared_env)
        self.model_player_ids = model_player_ids

    async def make_move(self, player_id: int, move: str) -> None:
        if player_id in self.model_player_ids:
            cell = parse_move(move)
            move = f"[{cell}]" if cell is not None else "(no move)"
        await super().make_move(player_id, move)


def board_text(board: list[str]) -> str:
    rows = [" | ".join(board[r * 3 + c] or str(r * 3 + c) for c in range(3)) for r in range(3)]
    return "\n---+---+---\n".join(f" {row} " for row in rows)


def prompt_text(board: list[str], symbol: str) -> str:
    other = "X" if symbol == "O" else "O"
    free = ", ".join(str(i) for i in range(9) if board[i] == "")
    return (
        f"You are playing tic-tac-toe as {symbol} against {other}. Three in a row wins.\n"
        f"Board (a number is a free cell):\n{board_text(board)}\n"
        f"Free cells: {free}\n"
        "Reply with your move: a free cell number in brackets, e.g. [4]."
    )


@dataclass
class TicTacToeEnv(TwoPlayerEnv):
    """The cookbook's TwoPlayerEnv against a fixed opponent, with our reward, prompt and per-turn logs."""

    turns: list[dict[str, Any]] = field(default_factory=list)

    @property
    def symbol(self) -> str:
        return SYMBOLS[self.player_id]

    @property
    def stop_condition(self) -> StopCondition:
        # The model's own end-of-turn token (the recipe stops at "]\n", which chat models rarely write).
        return self.renderer.get_stop_sequences()

    def board(self) -> list[str]:
        rows = self.coordinator.state.game_state["board"]
        return [rows[i // 3][i % 3] for i in range(9)]

    async def initial_observation(self) -> tuple[tinker.ModelInput, StopCondition]:
        if self.player_id != 0:
            await self.wait_for_turn()
        # The board even when the other seat already ended the game (self-play): the loop samples a first turn.
        text = prompt_text(self.board(), self.symbol)
        return self.renderer.build_generation_prompt([{"role": "user", "content": text}]), self.stop_condition

    def get_observation(self) -> tinker.ModelInput:
        if self.coordinator.game_done:
            return tinker.ModelInput.empty()
        text = prompt_text(self.board(), self.symbol)
        return self.renderer.build_generation_prompt([{"role": "user", "content": text}])

    def outcome(self) -> str | None:
        """win / draw / loss, or None while the game goes on (an illegal move by the model is a loss)."""
        coordinator = self.coordinator
        if coordinator.illegal_player_id is not None:
            if coordinator.illegal_player_id == self.player_id:
                return LOSS
            if not self.self_play:
                raise RuntimeError("the fixed opponent made an illegal move")  # it only picks free cells
            return OTHER_ILLEGAL
        rewards = coordinator.rewards
        if not coordinator.state.done or not rewards:
            return None
        mine = rewards[self.player_id]
        return WIN if mine > 0 else LOSS if mine < 0 else DRAW

    def illegal(self) -> bool:
        return self.coordinator.illegal_player_id == self.player_id

    def compute_reward(self) -> float:
        outcome = self.outcome()
        if outcome is None:
            return 0.0
        if self.illegal():
            return ILLEGAL_MOVE_REWARD + LEGAL_MOVE_CREDIT * self.board().count(self.symbol)
        return REWARDS[outcome]

    async def step(self, action: Action, *, extra: ActionExtra | None = None) -> StepResult:
        before = self.board()
        text = get_text_content(self.renderer.parse_response(action)[0])
        # self-play: the other seat ended the game before this seat's first move
        if self.coordinator.game_done:
            result = StepResult(
                reward=self.compute_reward(),
                episode_done=True,
                next_observation=tinker.ModelInput.empty(),
                next_stop_condition=self.stop_condition,
            )
        else:
            result = await super().step(action, extra=extra)
        after = self.board()
        mine = [i for i in range(9) if before[i] == "" and after[i] == self.symbol]
        theirs = [i for i in range(9) if before[i] == "" and after[i] not in ("", self.symbol)]
        outcome = self.outcome()
        if self.illegal():
            cell = parse_move(text)
            why = (
                "no [cell] in the answer"
                if cell is None
                else (f"cell {cell} is not 0-8" if cell > 8 else f"cell {cell} is already taken")
            )
            happened = f"illegal move ({why}): loss"
        else:
            happened = f"{self.symbol} took {mine[0]}" if mine else "no move"
            if theirs:
                happened += f"; {SYMBOLS[1 - self.player_id]} took {theirs[0]}"
            elif outcome == OTHER_ILLEGAL:
                happened += f"; {SYMBOLS[1 - self.player_id]} made an illegal move"
            if outcome is not None:
                happened += f"; {outcome}"
        turn = {
            "turn": len(self.turns) + 1,
            "seat": self.symbol,
            "player": text,
            "env": happened,
            "reward": result.reward,
            "board": board_text(before),
            "move": mine[0] if mine else None,
            "opponent_move": theirs[0] if theirs else None,
            "board_after": board_text(after),
        }
        self.turns.append(turn)
        result.logs = {**result.logs, **turn}
        if result.episode_done and outcome is not None:
            result.metrics = {
                **result.metrics,
                "win": float(outcome == WIN),
                "draw": float(outcome == DRAW),
                "loss": float(outcome == LOSS),
                "illegal_move": float(self.illegal()),
                **({"opponent_illegal_move": float(outcome == OTHER_ILLEGAL)} if self.self_play else {}),
            }
        return result


def make_env(game: dict, ctx: EnvContext) -> TicTacToeEnv:
    """One game: the seat and the opponent's seed come from the game dict."""
    shared = ta.make(env_id=GAME_ID)
    shared.reset(num_players=2, seed=int(game["opponent_seed"]))
    return TicTacToeEnv(
        player_id=int(game["player_id"]),
        coordinator=ModelMoveCoordinator(shared, {int(game["player_id"])}),
        self_play=False,
        renderer=ctx.renderer,
        opponent_policy=make_opponent(game["opponent"], int(game["opponent_seed"])),
    )


@dataclass
class SelfPlayGames(EnvGroupBuilder):
    """One RL group of self-play: `size / 2` games of the policy against itself, both seats of each game."""

    game: dict
    ctx: EnvContext
    size: int

    async def make_envs(self) -> Sequence[TicTacToeEnv]:
        envs = []
        for _ in range(self.size // 2):
            shared = ta.make(env_id=GAME_ID)
            shared.reset(num_players=2, seed=int(self.game["opponent_seed"]))
            coordinator = ModelMoveCoordinator(shared, {0, 1})
            envs += [
                TicTacToeEnv(
                    player_id=seat,
                    coordinator=coordinator,
                    self_play=True,
                    renderer=self.ctx.renderer,
                    opponent_policy=None,
                )
                for seat in (0, 1)
            ]
        return envs

    def logging_tags(self) -> list[str]:
        return [TicTacToe.tag]


# ------------------------------------------------------------------------------------------ the environment

_SEED_SPACE = 2**31


def _game(player_id: int, opponent: str, opponent_seed: int) -> dict:
    symbol = "O (moves first)" if player_id == 0 else "X (moves second)"
    return {
        "question": f"tic-tac-toe as {symbol} against the {opponent} opponent, game seed {opponent_seed}",
        "answer": "win",
        "player_id": player_id,
        "opponent": opponent,
        "opponent_seed": opponent_seed,
    }


def games(n_train: int, n_eval: int, seed: int, opponent: str) -> ProblemSet:
    if opponent == "self":
        return _self_play_games(n_train, n_eval, seed)
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
        [_game(i % 2, opponent, s) for i, s in enumerate(train_seeds)],
        [_game(i % 2, opponent, s) for i, s in enumerate(eval_seeds)],
        {
            "source": f"textarena TicTacToe-v0 against the {opponent} opponent (seeded); the model plays O "
            "(first) and X in alternate games",
            "eval_source": f"{n_eval} held-out games (opponent seeds from seed {seed + 1}, none used in training)",
            "score": "win rate; reward win 1, draw 0.5, loss 0, illegal move (ends the game) -0.5 + 0.1 per legal move",
        },
    )


def _self_play_games(n_train: int, n_eval: int, seed: int) -> ProblemSet:
    """Training games against itself (each group fills both seats); held-out games against the random opponent."""
    against_random = games(n_train, n_eval, seed, SELF_PLAY_EVAL_OPPONENT)
    train = [
        {
            **g,
            "question": f"tic-tac-toe against itself, both seats, game seed {g['opponent_seed']}",
            "opponent": "self",
        }
        for g in against_random.train
    ]
    info = {
        **against_random.info,
        "source": "textarena TicTacToe-v0, self-play: the policy plays both seats (O moves first) of each training "
        "game, and both seats' turns train",
        "eval_source": f"{against_random.info['eval_source']}, against the {SELF_PLAY_EVAL_OPPONENT} opponent "
        "(self-play trains; a fixed opponent measures)",
    }
    return ProblemSet(train, against_random.eval, info)


class TicTacToe(Environment):
    tag = "tic_tac_toe"
    score_label = "win rate"
    noun = "games"
    takes_verifier = False

    def problems(self, spec: EnvSpec, cfg: ProblemSettings, data: LoadedData | None) -> ProblemSet:
        return games(n_train(cfg), n_eval(cfg), cfg.seed, cfg.game_opponent or "random")

    def prompt(self, problem: dict, ctx: EnvContext) -> list[Message]:
        return [{"role": "user", "content": prompt_text([""] * 9, SYMBOLS[int(problem["player_id"])])}]

    def max_turns(self, spec: EnvSpec) -> int:
        return MAX_MODEL_TURNS

    def make_env(self, problem: dict, ctx: EnvContext) -> TicTacToeEnv:
        return make_env(problem, ctx)

    def group_builder(self, problem: dict, ctx: EnvContext, group_size: int) -> EnvGroupBuilder:
        if problem["opponent"] == "self":
            return SelfPlayGames(problem, ctx, group_size)
        # Every rollout of a group plays the same seat against the same opponent seed: like is compared with like.
        return problem_group(make_env, problem, ctx, group_size, self.tag)

    def row(self, index: int, problem: dict, episode: Episode) -> RLExample:
        """The game's score as the row's reward (win 1, draw 0.5, loss 0; an illegal move is a loss)."""
        from posttrain.pipeline.results import RLExample

        env = episode.env
        assert isinstance(env, TicTacToeEnv)
        outcome = env.outcome()
        if outcome is None:
            raise RuntimeError(f"the game did not end within {MAX_MODEL_TURNS} turns")
        record = RLExample(
            index, problem["question"], str(problem["answer"]), "", "", outcome == WIN, transcript=env.turns
        )
        record.completion = "\n".join(t["player"] for t in env.turns)
        record.extracted_answer = " ".join(str(t["move"]) for t in env.turns if t["move"] is not None)
        record.reward = REWARDS[outcome]
        record.details = {
            "outcome": outcome,
            "illegal_move": env.illegal(),
            "player": env.symbol,
            "opponent": problem["opponent"],
        }
        return record

    def score(self, rows: Sequence[RLExample]) -> float:
        return sum(1 for r in rows if r.correct) / len(rows) if rows else float("nan")
