"""RL evaluation: each held-out problem played once in the environment's own env, by the cookbook's own rollout
function (`do_single_rollout`): the same episode loop that training runs, so the score and the reward agree.

The policy samples each turn with the run's evaluation settings (greedy by default) and a seed fixed per problem
and turn, so reruns are comparable. The environment reads each finished episode as a results row and scores a
model from its rows (`envs.base.Environment`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import tinker
from tinker_cookbook.completers import StopCondition, TokenCompleter, TokensWithLogprobs
from tinker_cookbook.rl.rollouts import do_single_rollout

from posttrain.pipeline.envs.base import EnvContext, Environment, Episode
from posttrain.pipeline.evaluation.common import SamplingSettings, bounded_gather, check_some_succeeded
from posttrain.pipeline.results import RLExample
from posttrain.util import short_error


@dataclass
class SeededPolicy(TokenCompleter):
    """One sample per turn with the evaluation's settings; turn t of problem i has seed `seed + 1000 * i + t`."""

    client: tinker.SamplingClient
    settings: SamplingSettings
    problem: int
    turn: int = field(default=0)

    async def __call__(
        self, model_input: tinker.ModelInput, stop: StopCondition, *, max_tokens: int | None = None
    ) -> TokensWithLogprobs:
        params = tinker.SamplingParams(
            max_tokens=min(max_tokens or self.settings.max_tokens, self.settings.max_tokens),
            temperature=self.settings.temperature,
            stop=stop,
            seed=self.settings.seed + 1000 * self.problem + self.turn,
        )
        self.turn += 1
        response = await self.client.sample(model_input, num_samples=1, sampling_params=params)
        sequence = response.sequences[0]
        return TokensWithLogprobs(
            sequence.tokens, sequence.logprobs, sequence.stop_reason, sequence.sequence_id
        )


@dataclass(frozen=True)
class HeldOut:
    """What an evaluation runs: the environment, its problems and their context (phase = the model's label)."""

    environment: Environment
    problems: Sequence[dict]
    ctx: EnvContext
    desc: str = ""  # the progress bar's label (default: the model's)


async def evaluate_episodes(
    client: tinker.SamplingClient, held_out: HeldOut, settings: SamplingSettings
) -> tuple[list[RLExample], float]:
    """Per-problem rows in the RL schema and the model's score (the environment's: accuracy, win rate, ...)."""
    environment, ctx = held_out.environment, held_out.ctx

    async def one(i: int, problem: dict) -> RLExample:
        try:
            env = environment.make_env(problem, ctx)
            trajectory = await do_single_rollout(SeededPolicy(client, settings, i), env)
            return environment.row(i, problem, Episode(env, trajectory, ctx.renderer))
        except Exception as exc:  # noqa: BLE001 - one bad problem must not stop the evaluation
            record = RLExample(
                i, str(problem.get("question", "")), str(problem.get("answer", "")), "", "", False
            )
            record.error = short_error(exc)
            return record

    desc = held_out.desc or ctx.phase
    records = await bounded_gather(list(held_out.problems), one, settings.concurrency, desc)
    check_some_succeeded(records, desc)
    return records, environment.score(records)
