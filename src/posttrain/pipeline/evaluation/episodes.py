"""The same evaluation for the base model and the trained model, with concurrent requests.

SFT: per example, the NLL of the held-out completion tokens (the tokens `train_on_what` trains on), computed
the way the cookbook's `SamplerNLLEvaluator` does (`compute_logprobs` on the full sequence); the aggregate is
the token-weighted mean, the cookbook's `compute_mean_nll`.
RL: per problem, one sampled answer with the training prompt, extracted and graded the same way as the reward.
Preference (DPO): per held-out pair, the length-normalised log-prob (mean over completion tokens) of the chosen
and of the rejected completion; the pair is right when chosen > rejected; the aggregate is that accuracy.
Pairs that carry a ground truth (a verifiable task) are also answered by sampling (`evaluate_pair_answers`):
the model's answer to the prompt is graded like an RL answer, which gives the task accuracy.
A failed example is recorded with its error and does not stop the evaluation; an evaluation in which every
example failed stops the run with the first error (`EvaluationFailed`), since it measured nothing.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
import tinker
from tinker_cookbook import renderers
from tqdm.asyncio import tqdm_asyncio

from posttrain.errors import UserError
from posttrain.pipeline.console import CONSOLE
from posttrain.pipeline.envs.dataset import prompt_messages
from posttrain.pipeline.results import PreferenceExample, RLExample, SFTExample
from posttrain.pipeline.scoring.scorer import Scorer
from posttrain.util import short_error

T = TypeVar("T")


class EvaluationFailed(UserError):
    """Every example of an evaluation failed (the service refused them all): there is no score to report."""


def _check_some_succeeded(records: Sequence[SFTExample] | Sequence[RLExample], desc: str) -> None:
    errors = [r.error for r in records if r.error]
    if records and len(errors) == len(records):
        raise EvaluationFailed(f"evaluation of the {desc} failed on all {len(records)} examples: {errors[0]}")


@dataclass(frozen=True)
class SamplingSettings:
    max_tokens: int
    temperature: float
    seed: int


async def bounded_gather(
    items: Sequence[Any], work: Callable[[int, Any], Awaitable[T]], concurrency: int, desc: str
) -> list[T]:
    semaphore = asyncio.Semaphore(concurrency)

    async def one(i: int, item: Any) -> T:
        async with semaphore:
            return await work(i, item)

    tasks = [one(i, x) for i, x in enumerate(items)]
    return list(await tqdm_asyncio.gather(*tasks, desc=desc, leave=False, file=CONSOLE.stream))


def logprobs_after_first(logprobs: Sequence[float | None], n_tokens: int) -> np.ndarray:
    """The log-probabilities of tokens 2..n of an n-token sequence scored by compute_logprobs, aligned by length,
    never by position: Tinker and the local engine answer n values with a leading None (the first token has no
    context), other Tinker-protocol servers (SkyRL) n-1 values without it."""
    if len(logprobs) == n_tokens:
        logprobs = logprobs[1:]
    elif len(logprobs) != n_tokens - 1:
        raise ValueError(f"compute_logprobs returned {len(logprobs)} values for a {n_tokens}-token sequence")
    if any(lp is None for lp in logprobs):
        raise ValueError("compute_logprobs returned no log-probability for a token after the first")
    return np.array(logprobs, dtype=np.float64)


async def _completion_logprobs(client: tinker.SamplingClient, datum: tinker.Datum) -> np.ndarray:
    """Per-token logprobs aligned with the datum's weights (the cookbook's NLL evaluator does the same).

    A datum's model_input drops the last token and its weights align with target_tokens; compute_logprobs
    scores the rebuilt full sequence, and every position but the first is kept.
    """
    target_tokens = datum.loss_fn_inputs["target_tokens"].data
    full_sequence = datum.model_input.append_int(int(target_tokens[-1]))
    logprobs = await client.compute_logprobs_async(full_sequence)
    return logprobs_after_first(logprobs, full_sequence.length)


async def evaluate_nll(
    client: tinker.SamplingClient,
    datums: Sequence[tinker.Datum],
    rows: Sequence[dict],
    concurrency: int,
    desc: str,
) -> tuple[list[SFTExample], float]:
    """Return (per-example rows in the SFT schema, token-weighted mean NLL over the successful examples)."""

    async def one(i: int, datum: tinker.Datum) -> tuple[SFTExample, float, float]:
        prompt, completion = _prompt_and_completion(rows[i])
        record = SFTExample(index=i, prompt=prompt, completion=completion, nll=None)
        try:
            lp = await _completion_logprobs(client, datum)
            weights = datum.loss_fn_inputs["weights"].to_numpy().astype(np.float64)
            if weights.sum() <= 0:
                raise ValueError(
                    "no completion tokens to score (all weights are zero; is max_length too short?)"
                )
            total = float(-(lp * weights).sum())
            record.nll = total / float(weights.sum())
            return record, total, float(weights.sum())
        except Exception as exc:  # noqa: BLE001 - one bad example must not stop the evaluation
            record.error = short_error(exc)
            return record, 0.0, 0.0

    scored = await bounded_gather(list(datums), one, concurrency, desc)
    _check_some_succeeded([s[0] for s in scored], desc)
    total = sum(s[1] for s in scored)
    tokens = sum(s[2] for s in scored)
    return [s[0] for s in scored], (total / tokens if tokens else float("nan"))


def _prompt_and_completion(row: dict) -> tuple[str, str]:
    messages = row["messages"]
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    prompt = "\n\n".join(f"{m['role']}: {m['content']}" for m in messages[:last])
    return prompt, messages[last]["content"]


async def evaluate_accuracy(
    client: tinker.SamplingClient,
    problems: Sequence[dict],
    renderer: renderers.Renderer,
    instruction: str,
    settings: SamplingSettings,
    concurrency: int,
    desc: str,
    scorer: Scorer | None = None,
    phase: str = "eval",
) -> tuple[list[RLExample], float]:
    """Return (per-problem rows in the RL schema, mean score over all problems; failures count as 0).

    The score is the same as the training reward's (`scoring`): 0/1 for graded answers, so the mean is the
    accuracy; the fraction of tests passed for code; the user verifier's value with `reward_fn=`."""
    stop = renderer.get_stop_sequences()
    scorer = scorer or Scorer()

    async def one(i: int, problem: dict) -> RLExample:
        record = RLExample(
            index=i,
            question=problem["question"],
            ground_truth=str(problem["answer"]),
            completion="",
            extracted_answer="",
            correct=False,
        )
        try:
            prompt = renderer.build_generation_prompt(prompt_messages(problem, instruction))
            params = tinker.SamplingParams(
                max_tokens=settings.max_tokens,
                temperature=settings.temperature,
                stop=stop,
                seed=settings.seed + i,
            )
            response = await client.sample_async(prompt, num_samples=1, sampling_params=params)
            message, _ = renderer.parse_response(response.sequences[0].tokens)
            completion = renderers.get_text_content(message)
            scored = await scorer.score(problem, completion, phase)
            record.completion, record.extracted_answer = completion, scored.extracted
            record.correct = scored.correct
            # 0/1 graders need no separate reward (it is `correct`); tests and verifiers give fractions.
            record.reward = scored.reward if scorer.verifier is not None or scored.details else None
            record.details = scored.details or None
            record.verifier_error = scored.verifier_error
        except Exception as exc:  # noqa: BLE001 - one bad example must not stop the evaluation
            record.error = short_error(exc)
        return record

    records = await bounded_gather(list(problems), one, concurrency, desc)
    _check_some_succeeded(records, desc)
    total = sum((r.reward if r.reward is not None else float(bool(r.correct))) for r in records)
    return records, (total / len(records) if records else float("nan"))


async def _mean_completion_logprob(client: tinker.SamplingClient, datum: tinker.Datum) -> float:
    lp = await _completion_logprobs(client, datum)
    weights = datum.loss_fn_inputs["weights"].to_numpy().astype(np.float64)
    if weights.sum() <= 0:
        raise ValueError("no completion tokens to score (all weights are zero; is max_length too short?)")
    return float((lp * weights).sum() / weights.sum())


async def evaluate_preference(
    client: tinker.SamplingClient,
    pairs: Sequence[tuple[tinker.Datum, tinker.Datum]],
    rows: Sequence[dict],
    concurrency: int,
    desc: str,
) -> tuple[list[PreferenceExample], float, float]:
    """Return (per-pair rows, preference accuracy, mean margin), over the pairs scored without error.

    Length-normalised so that a longer rejected answer is not "dispreferred" merely for having more tokens
    (DPO itself trains on summed log-probs; the evaluation asks which answer the model finds more likely per
    token)."""

    async def one(i: int, pair: tuple[tinker.Datum, tinker.Datum]) -> PreferenceExample:
        row = rows[i]
        prompt = "\n\n".join(f"{m['role']}: {m['content']}" for m in row["prompt"])
        record = PreferenceExample(i, prompt, row["chosen"], row["rejected"], None, None, None, None)
        try:
            chosen, rejected = await asyncio.gather(
                _mean_completion_logprob(client, pair[0]), _mean_completion_logprob(client, pair[1])
            )
            record.chosen_logprob, record.rejected_logprob = chosen, rejected
            record.margin = chosen - rejected
            record.correct = record.margin > 0
        except Exception as exc:  # noqa: BLE001 - one bad example must not stop the evaluation
            record.error = short_error(exc)
        return record

    records = await bounded_gather(list(pairs), one, concurrency, desc)
    scored = [r for r in records if r.error is None and r.margin is not None]
    if not scored:
        return records, float("nan"), float("nan")
    accuracy = sum(1 for r in scored if r.correct) / len(scored)
    return records, accuracy, sum(r.margin for r in scored if r.margin is not None) / len(scored)


async def evaluate_pair_answers(
    client: tinker.SamplingClient,
    records: Sequence[PreferenceExample],
    rows: Sequence[dict],
    renderer: renderers.Renderer,
    settings: SamplingSettings,
    concurrency: int,
    desc: str,
) -> float:
    """Answer each pair's prompt by sampling, grade it against the row's `answer`, and fill the records'
    task fields (ground_truth, completion, extracted_answer, task_correct). Returns the task accuracy over all
    pairs (a failed sample counts as wrong, as in RL evaluation)."""
    from posttrain.pipeline.scoring.grading import extract_answer, grade

    stop = renderer.get_stop_sequences()

    async def one(i: int, record: PreferenceExample) -> bool:
        record.ground_truth = str(rows[i]["answer"])
        record.completion, record.extracted_answer, record.task_correct = "", "", False
        try:
            params = tinker.SamplingParams(
                max_tokens=settings.max_tokens,
                temperature=settings.temperature,
                stop=stop,
                seed=settings.seed + i,
            )
            prompt = renderer.build_generation_prompt(rows[i]["prompt"])
            response = await client.sample_async(prompt, num_samples=1, sampling_params=params)
            message, _ = renderer.parse_response(response.sequences[0].tokens)
            record.completion = renderers.get_text_content(message)
            record.extracted_answer = extract_answer(record.completion)
        except Exception as exc:  # noqa: BLE001 - one bad sample must not stop the evaluation
            # The pair's preference score stands; its task answer is recorded as wrong, with the reason.
            record.extracted_answer = f"(sampling failed: {short_error(exc)})"
            return False
        # The cookbook's math grader (its timeout is a signal, so in this thread, not a worker thread).
        record.task_correct = bool(grade({"answer": record.ground_truth}, record.extracted_answer))
        return record.task_correct

    correct = await bounded_gather(list(records), one, concurrency, f"{desc}: task accuracy")
    return sum(correct) / len(correct) if correct else float("nan")


async def evaluate_games(
    client: tinker.SamplingClient,
    games: Sequence[dict],
    renderer: renderers.Renderer,
    settings: SamplingSettings,
    concurrency: int,
    desc: str,
) -> tuple[list[RLExample], float]:
    """Play each held-out game to the end with the game's env; rows carry the per-turn transcript and
    `details.outcome` (win/draw/loss). Returns (rows, win rate; a game that failed counts as not won)."""

    async def one(i: int, game: dict) -> RLExample:
        record = RLExample(i, game["question"], str(game["answer"]), "", "", False, transcript=[])
        try:
            if game.get("grader") == "game:tic_tac_toe":
                await _play_tic_tac_toe(client, game, renderer, settings, i, record)
            else:
                await _play_guess_number(client, game, renderer, settings, i, record)
        except Exception as exc:  # noqa: BLE001 - one bad game must not stop the evaluation
            record.error = short_error(exc)
        return record

    records = await bounded_gather(list(games), one, concurrency, desc)
    return records, (sum(1 for r in records if r.correct) / len(records) if records else float("nan"))


def _params(settings: SamplingSettings, stop: Any, game: int, turn: int) -> tinker.SamplingParams:
    return tinker.SamplingParams(
        max_tokens=settings.max_tokens,
        temperature=settings.temperature,
        stop=stop,
        seed=settings.seed + 1000 * game + turn,  # fixed per game and turn: reruns are comparable
    )


async def _play_guess_number(
    client: tinker.SamplingClient,
    game: dict,
    renderer: renderers.Renderer,
    settings: SamplingSettings,
    i: int,
    record: RLExample,
) -> None:
    """The cookbook's GuessNumberEnv; won when a step's reward is 1 (its "Correct")."""
    from tinker_cookbook.recipes.multiplayer_rl.guess_number.env import MAX_TURNS, GuessNumberEnv

    transcript: list[dict[str, Any]] = []
    record.transcript = transcript
    env = GuessNumberEnv(int(game["target"]), renderer)
    observation, stop = await env.initial_observation()
    for turn in range(1, MAX_TURNS + 1):
        response = await client.sample_async(
            observation, num_samples=1, sampling_params=_params(settings, stop, i, turn)
        )
        step = await env.step(response.sequences[0].tokens)
        transcript.append(
            {"turn": turn, "player": step.logs["guess"], "env": step.logs["feedback"], "reward": step.reward}
        )
        record.extracted_answer = str(step.logs["guess"]).removeprefix("Guess:").strip()
        if step.reward == 1.0:
            record.correct = True
        if step.episode_done:
            break
        observation, stop = step.next_observation, step.next_stop_condition
    record.completion = "\n".join(str(t["player"]) for t in transcript)
    record.details = {"outcome": "win" if record.correct else "loss"}


async def _play_tic_tac_toe(
    client: tinker.SamplingClient,
    game: dict,
    renderer: renderers.Renderer,
    settings: SamplingSettings,
    i: int,
    record: RLExample,
) -> None:
    """`tictactoe`'s env against the game's fixed opponent; the row's reward is the game's score (win 1, draw
    0.5, loss 0; an illegal move is a loss)."""
    from posttrain.pipeline.envs.games import tictactoe

    env = tictactoe.make_env(game, renderer)
    record.transcript = env.turns
    observation, stop = await env.initial_observation()
    for turn in range(1, tictactoe.MAX_MODEL_TURNS + 1):
        response = await client.sample_async(
            observation, num_samples=1, sampling_params=_params(settings, stop, i, turn)
        )
        step = await env.step(response.sequences[0].tokens)
        if step.episode_done:
            break
        observation, stop = step.next_observation, step.next_stop_condition
    outcome = env.outcome()
    if outcome is None:
        raise RuntimeError(f"the game did not end within {tictactoe.MAX_MODEL_TURNS} turns")
    record.completion = "\n".join(t["player"] for t in env.turns)
    record.extracted_answer = " ".join(str(t["move"]) for t in env.turns if t["move"] is not None)
    record.correct = outcome == tictactoe.WIN
    record.reward = tictactoe.REWARDS[outcome]
    record.details = {
        "outcome": outcome,
        "illegal_move": env.illegal(),
        "player": env.symbol,
        "opponent": game["opponent"],
    }


async def evaluate_tool_use(
    client: tinker.SamplingClient,
    problems: Sequence[dict],
    renderer: renderers.Renderer,
    settings: SamplingSettings,
    concurrency: int,
    desc: str,
    scorer: Scorer,
    max_turns: int,
    phase: str,
) -> tuple[list[RLExample], float]:
    """Run each held-out problem to the end in the same cookbook env as training (`tool_envs`), the model's
    tool calls answered by the real tools; the final answer is scored as the training reward scores it.

    Rows carry the per-turn transcript (`{turn, player, env, reward}`: the model's text as written, tool calls
    included; the tools' replies, "" after the final answer; the step's reward) and `details` {tool_calls,
    turns}. Returns (rows, accuracy of the final answers; the mean reward with a user verifier)."""
    from tinker_cookbook.rl.types import ActionExtra

    from posttrain.pipeline.envs.tools.agent import make_env, thread_safe

    shared = thread_safe(renderer)

    async def one(i: int, problem: dict) -> RLExample:
        record = RLExample(i, problem["question"], str(problem["answer"]), "", "", False, transcript=[])
        transcript: list[dict[str, Any]] = []
        record.transcript = transcript
        try:
            env, reward = make_env(problem, shared, scorer, max_turns, phase)
            start = await env.initial_observation()
            assert isinstance(start, tuple), "the prompt is longer than the model's context"
            observation, stop = start
            calls = 0
            for turn in range(1, max_turns + 1):
                params = tinker.SamplingParams(
                    max_tokens=settings.max_tokens,
                    temperature=settings.temperature,
                    stop=stop,
                    seed=settings.seed + 1000 * i + turn,  # fixed per problem and turn: reruns are comparable
                )
                response = await client.sample_async(observation, num_samples=1, sampling_params=params)
                sequence = response.sequences[0]
                step = await env.step(sequence.tokens, extra=ActionExtra(stop_reason=sequence.stop_reason))
                player = shared.decode(sequence.tokens)
                calls += sum(1 for key in step.logs if key.startswith("tool_call_"))
                transcript.append(
                    {"turn": turn, "player": player, "env": _tool_replies(step.logs), "reward": step.reward}
                )
                if step.episode_done:
                    break
                observation, stop = step.next_observation, step.next_stop_condition
            scored = reward.scored  # None: the episode ended without an answer (a malformed or cut-off turn)
            record.completion = reward.answer_text if scored is not None else transcript[-1]["player"]
            record.details = {"tool_calls": calls, "turns": len(transcript)}
            if scored is not None:
                record.extracted_answer, record.correct = scored.extracted, scored.correct
                record.reward = scored.reward if scorer.verifier is not None else None
                record.verifier_error = scored.verifier_error
        except Exception as exc:  # noqa: BLE001 - one bad problem must not stop the evaluation
            record.error = short_error(exc)
        return record

    records = await bounded_gather(list(problems), one, concurrency, desc)
    _check_some_succeeded(records, desc)
    total = sum((r.reward if r.reward is not None else float(bool(r.correct))) for r in records)
    return records, (total / len(records) if records else float("nan"))


def _tool_replies(logs: dict[str, Any]) -> str:
    # AgentToolMessageEnv logs each call's result as tool_result_<k>, and malformed calls as parse_errors.
    replies = [str(logs[k]) for k in sorted(logs) if k.startswith("tool_result_")]
    if "parse_errors" in logs:
        replies.append(f"(tool call not understood: {logs['parse_errors']})")
    return "\n".join(replies)
