"""SFT evaluation: per example, the NLL of the held-out completion tokens (the tokens `train_on_what` trains on),
computed the way the cookbook's `SamplerNLLEvaluator` does (`compute_logprobs` on the full sequence); the
aggregate is the token-weighted mean, the cookbook's `compute_mean_nll`.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import tinker

from posttrain.pipeline.evaluation.common import bounded_gather, check_some_succeeded
from posttrain.pipeline.results import SFTExample
from posttrain.util import short_error


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
    logprobs = await client.compute_logprobs(full_sequence)
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
    check_some_succeeded([s[0] for s in scored], desc)
    total = sum(s[1] for s in scored)
    tokens = sum(s[2] for s in scored)
    return [s[0] for s in scored], (total / tokens if tokens else float("nan"))


def _prompt_and_completion(row: dict) -> tuple[str, str]:
    messages = row["messages"]
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    prompt = "\n\n".join(f"{m['role']}: {m['content']}" for m in messages[:last])
    return prompt, messages[last]["content"]


async def mean_completion_logprob(client: tinker.SamplingClient, datum: tinker.Datum) -> float:
    lp = await _completion_logprobs(client, datum)
    weights = datum.loss_fn_inputs["weights"].to_numpy().astype(np.float64)
    if weights.sum() <= 0:
        raise ValueError("no completion tokens to score (all weights are zero; is max_length too short?)")
    return float((lp * weights).sum() / weights.sum())
