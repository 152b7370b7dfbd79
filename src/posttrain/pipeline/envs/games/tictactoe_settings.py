"""The settings of `env=game:tic_tac_toe`; a light module, read when the command line is (the game itself,
`games.tictactoe`, loads textarena and the cookbook)."""

from __future__ import annotations

from typing import Any, Literal

import chz

from posttrain.errors import ConfigError

# The opponent: a random free cell (seeded); win-or-block, else random; minimax; or the policy itself in training
# (self-play; evaluated against the random opponent).
GameOpponent = Literal["random", "blocker", "optimal", "self"]


@chz.chz
class OpponentOptions:
    game_opponent: GameOpponent | None = chz.field(
        default=None,
        doc="env=game:tic_tac_toe: the opponent, random|blocker|optimal, or self: the policy plays both seats in "
        "training (the cookbook's text_arena self-play) and is evaluated against random (None: random)",
    )

    @staticmethod
    def check(cfg: Any) -> None:
        if cfg.game_opponent != "self":
            return
        group_size = getattr(cfg, "group_size", None)
        if group_size is None or getattr(cfg, "teacher_model", None) is not None:
            raise ConfigError("game_opponent=self is only used by task=rl (self-play trains both seats)")
        if group_size % 2:
            raise ConfigError(
                f"game_opponent=self needs an even group_size (each game fills two seats), got {group_size}"
            )
