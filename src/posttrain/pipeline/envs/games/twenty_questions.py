"""`env=game:twenty_questions`: the cookbook's twenty questions
(`tinker_cookbook.recipes.multiplayer_rl.twenty_questions`), a model as the other player.

The policy asks yes/no questions and guesses with a line `Guess: <word>`; the answerer, a model the backend serves
(`partner_model=`, default the base model itself, never trained), holds the secret and answers each question
seeing only that question, as the recipe does. Reward 1 for the secret guessed within 20 questions, else 0 (the
recipe's `TwentyQuestionsEnv`, used as it is in training and evaluation alike).

Secrets: the recipe's word list and its own split (171 common nouns shuffled by seed 0, the last 34 held out; a
test pins the split to the recipe's builder), or the user's data (`dataset=` rows with a `secret` field, one
secret per row; held out as any dataset is). Which held-out secrets are played is fixed by the run's seed.

Ours: the answerer answers greedily (the recipe samples it at temperature 1), so a question gets the same answer
for the base and the trained model, and evaluation compares the askers, not the answerer's luck.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from importlib import resources
from typing import TYPE_CHECKING, Any

import chz

from posttrain.config.checks import not_blank
from posttrain.errors import ConfigError
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


@chz.chz
class PartnerOptions:
    partner_model: str | None = chz.field(
        default=None,
        doc="env=game:twenty_questions: the answerer, a model the backend serves by name, never trained (None: the "
        "base model itself)",
    )

    @staticmethod
    def check(cfg: Any) -> None:
        not_blank(cfg, "partner_model")
        if cfg.partner_model is not None and cfg.partner_model.startswith("tinker://"):
            raise ConfigError(
                f"partner_model={cfg.partner_model}: the partner must be a model the backend serves by name, not a "
                "checkpoint (the other player is never trained)"
            )


RECIPE = "tinker_cookbook.recipes.multiplayer_rl.twenty_questions"
MAX_QUESTIONS = 20  # the recipe's turn limit (TwentyQuestionsEnv.step)
ANSWER_TOKENS = 5  # the recipe's answerer max_tokens: "yes" or "no"
QUESTION = "twenty questions: find the secret word"


def cookbook_split() -> tuple[list[str], list[str]]:
    """The recipe's train and test words: its word list shuffled by seed 0, the last min(n/5, 100) held out."""
    text = resources.files(RECIPE).joinpath("common_english_nouns.txt").read_text()
    words = [line.strip() for line in text.splitlines()]
    random.Random(0).shuffle(words)
    n_test = min(len(words) // 5, 100)
    return words[:-n_test], words[-n_test:]


def _game(secret: str) -> dict:
    return {"question": QUESTION, "answer": secret, "secret": secret}


def _make_env(problem: dict, ctx: EnvContext) -> Env:
    from tinker_cookbook.recipes.multiplayer_rl.twenty_questions.env import TwentyQuestionsEnv

    if ctx.partner is None:
        raise RuntimeError("env=game:twenty_questions needs its answerer (partner_model) served")
    return TwentyQuestionsEnv(ctx.partner, problem["secret"], ctx.renderer)


class TwentyQuestions(Environment):
    tag = "twenty_questions"
    score_label = "win rate"
    noun = "games"
    takes_verifier = False

    def problems(self, spec: EnvSpec, cfg: ProblemSettings, data: LoadedData | None) -> ProblemSet:
        if data is not None:
            return self._from_data(data)
        train_words, test_words = cookbook_split()
        rng = random.Random(cfg.seed)
        train = [_game(rng.choice(train_words)) for _ in range(n_train(cfg))]
        chosen = random.Random(cfg.seed + 1).sample(test_words, min(n_eval(cfg), len(test_words)))
        return ProblemSet(
            train,
            [_game(w) for w in chosen],
            {
                "source": "the cookbook's twenty_questions words (multiplayer_rl recipe): "
                f"{len(train_words)} for training",
                "eval_source": f"{len(chosen)} of its {len(test_words)} held-out words, chosen by seed {cfg.seed + 1}",
                "score": f"win rate (the secret guessed within {MAX_QUESTIONS} questions)",
            },
        )

    @staticmethod
    def _from_data(data: LoadedData) -> ProblemSet:
        if data.format != "secret":
            raise ConfigError(
                f"env=game:twenty_questions: {data.source} has {data.format} rows; the game needs rows with a "
                '"secret" field (one secret word per row)'
            )
        return ProblemSet(
            [_game(r["secret"]) for r in data.train],
            [_game(r["secret"]) for r in data.eval],
            {
                "source": data.source,
                "eval_source": data.eval_source,
                "score": f"win rate (the secret guessed within {MAX_QUESTIONS} questions)",
            },
        )

    def prompt(self, problem: dict, ctx: EnvContext) -> list[Message]:
        from tinker_cookbook.recipes.multiplayer_rl.twenty_questions.env import PLAYER_SYSTEM_PROMPT

        return [{"role": "system", "content": PLAYER_SYSTEM_PROMPT}]

    def max_turns(self, spec: EnvSpec) -> int:
        return MAX_QUESTIONS

    def make_env(self, problem: dict, ctx: EnvContext) -> Env:
        return _make_env(problem, ctx)

    def group_builder(self, problem: dict, ctx: EnvContext, group_size: int) -> EnvGroupBuilder:
        return problem_group(_make_env, problem, ctx, group_size, self.tag)

    def row(self, index: int, problem: dict, episode: Episode) -> RLExample:
        """Won when a turn's reward is 1 (the secret guessed); the transcript has each question and its answer."""
        from posttrain.pipeline.results import RLExample

        turns = getattr(episode.env, "turns", [])
        asked = [t["content"] for t in turns if t["role"] == "player"]
        answered = [t["content"] for t in turns if t["role"] == "answerer"]
        rewards = [t.reward for t in episode.trajectory.transitions]
        transcript = [
            {"turn": n, "player": q, "env": a, "reward": r}
            for n, (q, a, r) in enumerate(zip(asked, answered, rewards, strict=False), 1)
        ]
        won = any(r == 1.0 for r in rewards)
        guesses = [q.removeprefix("Guess:").strip() for q in asked if q.startswith("Guess:")]
        record = RLExample(
            index,
            problem["question"],
            problem["secret"],
            "\n".join(asked),
            guesses[-1] if guesses else None,
            won,
            transcript=transcript,
        )
        record.reward = 1.0 if won else 0.0
        record.details = {
            "outcome": "win" if won else "loss",
            "questions": len(asked),
            "guesses": len(guesses),
        }
        return record

    def score(self, rows: Sequence[RLExample]) -> float:
        return sum(1 for r in rows if r.correct) / len(rows) if rows else float("nan")

    def summary(self, rows: dict[str, list[RLExample]]) -> dict[str, Any]:
        """The mean number of questions and of guesses per game, by model: what a win rate of 0 still shows."""
        out: dict[str, Any] = {}
        for label, records in rows.items():
            details = [r.details or {} for r in records]
            if details:
                out[label] = {
                    "mean_questions": sum(d.get("questions", 0) for d in details) / len(details),
                    "mean_guesses": sum(d.get("guesses", 0) for d in details) / len(details),
                }
        return {"game_play": out} if out else {}
