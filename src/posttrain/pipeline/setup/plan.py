"""What a run will cost before it runs: tokens by how Tinker bills them, the price on Tinker, the time locally.

Token counts come from the method, by rendering the user's data with the run's renderer and tokenizer. On
Tinker the price is token counts x the published per-token prices (the service's current table as the cookbook
reads it, or offline the `tinker-cost` package's copy, always named); a Tinker plan needs no service. Locally
the time comes from a short probe of the engine that will do the work: one warmed-up training step, a few
concurrent samples and a logprob pass, at the run's sequence lengths.
"""

from __future__ import annotations

import asyncio
import math
import random
import time
from dataclasses import asdict, dataclass, field, replace
from importlib import metadata
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import tinker

_PER_MILLION = 1_000_000


@dataclass(frozen=True)
class SequentialTurns:
    """The turns of multi-turn episodes that are played one after another: a turn waits for the one before it, so
    however fast the engine samples in bulk, sampling takes at least these turns' latency in a row. The games of a
    training step (and those of an evaluation, up to its concurrency) play at the same time."""

    count: int  # turns in a row over the whole run: turns per game x (training steps + evaluation rounds)
    per_game: int  # turns a game lasts, at most
    # sample requests in a row per turn: the policy's, then a partner's reply (twenty questions)
    requests: int
    tokens: int  # tokens those requests sample in all, at most
    concurrency: int  # games played at once
    context: int  # tokens a turn's request reads, on average (the conversation so far)

    def note(self) -> str:
        return (
            f"time: {self.count:,} turns played one after another ({self.per_game} a game; the games of a step "
            "or an evaluation play at once)"
        )


@dataclass(frozen=True)
class TokenBudget:
    """Tokens a run processes, split the way Tinker bills them."""

    train: int  # tokens through forward_backward
    prefill: int  # prompt tokens of sampling and logprob requests
    sample: int  # generated tokens (an upper bound: every completion may stop before max_tokens)
    train_steps: int
    sequences_per_step: int
    mean_train_length: float
    notes: list[str] = field(default_factory=list)
    # multi-turn episodes; None: one turn, where throughput sets the time
    turns: SequentialTurns | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def sequential_turns(
    cfg: Any, turns: int, steps: int, held_out: int, partner: bool, context: int
) -> SequentialTurns:
    """An RL run's turns in a row (`cfg`: its settings): every training step plays its games' `turns` one after
    another, and so does each evaluation (base, trained, and the in-loop ones of eval_every) for each round of
    eval_concurrency games; a partner's reply is a second request in each turn."""
    from posttrain.pipeline.envs.dataset import PARTNER_MAX_TOKENS

    evaluations = 2 + (steps // cfg.eval_every if cfg.eval_every > 0 else 0)
    rounds = steps + evaluations * math.ceil(held_out / cfg.eval_concurrency)
    return SequentialTurns(
        count=turns * rounds,
        per_game=turns,
        requests=2 if partner else 1,
        tokens=cfg.max_tokens + (PARTNER_MAX_TOKENS if partner else 0),
        concurrency=max(cfg.batch_size * cfg.group_size, min(held_out, cfg.eval_concurrency)),
        context=context,
    )


def episode_tokens(
    cfg: Any, prompt: float, turns: int, steps: int, held_out: int, partner: str | None
) -> TokenBudget:
    """An RL run's tokens (`cfg`: its settings; `prompt`: the mean prompt's tokens): `steps` training steps of
    rollouts and `held_out` problems played by each model. Multi-turn: at most `turns` turns, each re-reading the
    conversation so far; an environment's reply is counted like a turn of max_tokens."""
    trajectory = prompt + (2 * turns - 1) * cfg.max_tokens
    rollouts = steps * cfg.batch_size * cfg.group_size
    episodes = rollouts + 2 * held_out
    notes = [f"upper bound: every completion counted at max_tokens={cfg.max_tokens}"]
    # what a turn reads, on average: midway through a game
    context = prompt + (turns - 1) * cfg.max_tokens
    in_a_row = None
    if turns > 1:
        in_a_row = sequential_turns(cfg, turns, steps, held_out, partner is not None, round(context))
        notes += [f"upper bound: every episode counted at {turns} turns", in_a_row.note()]
    budget = TokenBudget(
        train=round(rollouts * trajectory),
        prefill=round(episodes * turns * context),
        sample=episodes * turns * cfg.max_tokens,
        train_steps=steps,
        sequences_per_step=cfg.batch_size * cfg.group_size,
        mean_train_length=trajectory,
        notes=notes,
        turns=in_a_row,
    )
    if partner is not None:
        budget = partner_tokens(budget, partner, episodes * turns, prompt + cfg.max_tokens)
    return budget


def partner_tokens(budget: TokenBudget, partner: str, replies: int, reads: float) -> TokenBudget:
    """`budget` with a game partner's replies added: each reads `reads` tokens (its own prompt, counted as long as
    the policy's: both are the game's rules, and the policy's last turn) and writes a few."""
    from posttrain.pipeline.envs.dataset import PARTNER_MAX_TOKENS

    note = f"partner {partner}: one reply of at most {PARTNER_MAX_TOKENS} tokens per turn"
    return replace(
        budget,
        prefill=round(budget.prefill + replies * reads),
        sample=round(budget.sample + replies * PARTNER_MAX_TOKENS),
        notes=[*budget.notes, note],
    )


def tinker_price(model_name: str, budget: TokenBudget) -> dict[str, Any]:
    """The estimated Tinker bill in USD, or why there is none (a model without a published price).

    Rates: the service's current published table (`models.json`, read by the cookbook's cost estimation, as its
    training loops do); when that cannot be fetched (offline), the `tinker-cost` package's copy of the table,
    named as such. A model in neither has no price: never a guess. Every prefill token is priced uncached (an
    upper bound: prefix-cache hits are cheaper).
    """
    from tinker_cookbook.utils.cost_estimation import TokenUsage

    rates, source = _published_rates(model_name)
    if rates is None:
        return {"usd": None, "source": source, "note": f"no published price for {model_name} in {source}"}
    kinds = {
        "train": TokenUsage(trained=budget.train),
        "prefill": TokenUsage(prefill_uncached=budget.prefill),
        "sample": TokenUsage(sampled=budget.sample),
    }
    by_kind = {kind: rates.estimate_usd(usage) for kind, usage in kinds.items()}
    return {
        "usd": round(sum(by_kind.values()), 4),
        "usd_by_kind": {k: round(v, 4) for k, v in by_kind.items()},
        "usd_per_million": {
            "train": rates.train_usd_per_million,
            "prefill": rates.prefill_usd_per_million,
            "cached_prefill": rates.cached_prefill_usd_per_million,
            "sample": rates.sample_usd_per_million,
        },
        "source": source,
    }


def _published_rates(model_name: str) -> tuple[Any, str]:
    """(the model's TokenCostRates or None, where the table came from)."""
    from tinker_cookbook.utils import cost_estimation

    entries = cost_estimation.load_model_pricing()
    if entries is not None:
        entry = next((e for e in entries if e.get("tinker_id") == model_name), None)
        rates = cost_estimation.rates_from_pricing_entry(entry) if entry is not None else None
        return rates, f"the published price table {cost_estimation.PRICING_URL}"
    from tinker_cost import PRICING

    version = metadata.version("tinker-cost")
    source = (
        f"the tinker-cost {version} package's copy of the published prices ({cost_estimation.PRICING_URL} "
        "could not be fetched)"
    )
    if model_name not in PRICING:
        return None, source
    prefill, sample, train = PRICING[model_name]
    # That copy has no cached-prefill column; the plan never assumes a cache hit.
    return cost_estimation.TokenCostRates(prefill, prefill, sample, train), source


PROBE_MAX_LENGTH = 1024
# Tokens in the probe's training step. A step's time grows with its tokens (the engine packs them into micro-batches
# of a few hundred), so a few sequences give the run's rate per token: a full RL step (64 rollouts of ~350 tokens)
# took minutes to probe twice.
PROBE_TRAIN_TOKENS = 2048


async def probe_rates(
    service: tinker.ServiceClient, model_name: str, budget: TokenBudget, lora_rank: int
) -> dict[str, float]:
    """Tokens per second of this backend for training, prefill and sampling, at the run's shapes.

    Random tokens stand in for the data: speed depends on lengths and batch size, not on which tokens.
    """
    import tinker

    rng = random.Random(0)
    # A rate per token, measured at the run's length up to PROBE_MAX_LENGTH: a multi-turn budget's upper-bound
    # length can exceed a small model's context window, which the probe's random sequence must fit in.
    length = min(PROBE_MAX_LENGTH, max(8, round(budget.mean_train_length)))
    batch = max(1, min(budget.sequences_per_step, PROBE_TRAIN_TOKENS // length))
    training = await service.create_lora_training_client(base_model=model_name, rank=lora_rank)
    vocab = training.get_tokenizer().vocab_size
    datums = [_random_datum(rng, vocab, length) for _ in range(batch)]
    adam = tinker.AdamParams(learning_rate=1e-6)
    rates: dict[str, float] = {}

    async def step() -> None:
        fwd = training.forward_backward(datums, loss_fn="cross_entropy")
        opt = training.optim_step(adam)  # submitted before waiting: the service runs it right after
        await fwd.result_async()
        await opt.result_async()

    await step()  # warm-up: the first step pays for allocation and compilation
    started = time.monotonic()
    await step()
    rates["train_tokens_per_s"] = batch * length / (time.monotonic() - started)

    sampler = await service.create_sampling_client(base_model=model_name)
    prompt = tinker.ModelInput.from_ints([rng.randrange(vocab) for _ in range(length)])
    started = time.monotonic()
    await asyncio.gather(*(sampler.compute_logprobs(prompt) for _ in range(8)))
    rates["prefill_tokens_per_s"] = 8 * length / (time.monotonic() - started)

    new_tokens = 16
    params = tinker.SamplingParams(max_tokens=new_tokens, temperature=1.0, seed=0)
    started = time.monotonic()
    replies = await asyncio.gather(
        *(sampler.sample(prompt, num_samples=1, sampling_params=params) for _ in range(16))
    )
    produced = sum(len(r.sequences[0].tokens) for r in replies)
    rates["sample_tokens_per_s"] = produced / (time.monotonic() - started)
    rates = {k: round(v, 1) for k, v in rates.items()} | {
        "probe_train_sequences": batch,
        "probe_length": length,
    }
    if budget.turns is not None:
        rates |= await _turn_latency(sampler, rng, vocab, budget.turns)
    return rates


PROBE_TURN_TOKENS = 16
PROBE_MAX_CONCURRENCY = 64


async def _turn_latency(
    sampler: tinker.SamplingClient, rng: random.Random, vocab: int, turns: SequentialTurns
) -> dict[str, float]:
    """Seconds one round of a turn's requests takes at the run's concurrency and context: `turn_request_s` for a
    request that samples one token (reading its context included), `turn_token_s` for each token after that."""
    import tinker

    length = max(8, min(PROBE_MAX_LENGTH, turns.context))
    prompt = tinker.ModelInput.from_ints([rng.randrange(vocab) for _ in range(length)])

    async def one_round(max_tokens: int) -> tuple[float, int]:
        params = tinker.SamplingParams(max_tokens=max_tokens, temperature=1.0, seed=0)
        started = time.monotonic()
        replies = await asyncio.gather(
            *(
                sampler.sample(prompt, num_samples=1, sampling_params=params)
                for _ in range(max(1, min(turns.concurrency, PROBE_MAX_CONCURRENCY)))
            )
        )
        # The round lasts as long as its longest reply: that many decoding steps.
        return time.monotonic() - started, max(len(r.sequences[0].tokens) for r in replies)

    request, _ = await one_round(1)
    longer, produced = await one_round(PROBE_TURN_TOKENS)
    per_token = max(0.0, longer - request) / max(1, produced - 1)
    return {"turn_request_s": round(request, 4), "turn_token_s": round(per_token, 5)}


def _random_datum(rng: random.Random, vocab: int, length: int) -> tinker.Datum:
    import numpy as np
    import tinker

    tokens = np.array([rng.randrange(vocab) for _ in range(length + 1)], dtype=np.int64)
    return tinker.Datum(
        model_input=tinker.ModelInput.from_ints(tokens[:-1].tolist()),
        loss_fn_inputs={
            "target_tokens": tinker.TensorData.from_numpy(tokens[1:]),
            "weights": tinker.TensorData.from_numpy(np.ones(length, dtype=np.float32)),
        },
    )


def estimated_seconds(budget: TokenBudget, rates: dict[str, float]) -> float:
    """Training, prefill and sampling time at the probed rates (sampling at its upper bound). Multi-turn
    episodes sample at least as long as their turns in a row take, however fast the engine samples in bulk."""
    sampling = budget.prefill / rates["prefill_tokens_per_s"] + budget.sample / rates["sample_tokens_per_s"]
    if budget.turns is not None and "turn_request_s" in rates:
        sampling = max(sampling, turns_seconds(budget.turns, rates))
    return budget.train / rates["train_tokens_per_s"] + sampling


def turns_seconds(turns: SequentialTurns, rates: dict[str, float]) -> float:
    """The turns played one after another: each turn's requests in a row, each paying a request's latency (its
    first token included) and then a decoding step for every further token."""
    one_turn = (
        turns.requests * rates["turn_request_s"] + (turns.tokens - turns.requests) * rates["turn_token_s"]
    )
    return turns.count * one_turn


def minutes(seconds: float) -> str:
    return f"{seconds / 60:.1f} min" if seconds >= 90 else f"{seconds:.0f} s"


def plan_lines(outcome: dict[str, Any]) -> list[str]:
    """The plan as the console shows it."""
    tokens = outcome["tokens"]
    lines = [
        f"{tokens['train_steps']} steps of {tokens['sequences_per_step']} sequences "
        f"(mean {tokens['mean_train_length']:.0f} tokens)",
        f"tokens: train {tokens['train']:,}, prefill {tokens['prefill']:,}, sample {tokens['sample']:,}",
        *tokens["notes"],
    ]
    if "warning" in outcome:  # too few steps to move the method's metric (`methods.length.too_short`)
        lines.append(outcome["warning"])
    if "tinker_cost" in outcome:
        cost = outcome["tinker_cost"]
        price = f"${cost['usd']:.4f}" if cost["usd"] is not None else f"unknown ({cost['note']})"
        lines.append(f"estimated Tinker cost: {price}; prices: {cost['source']}")
    else:
        rates = outcome["rates"]
        lines.append(
            f"estimated time on this machine: {minutes(outcome['seconds'])} "
            f"(engine start {minutes(outcome['startup'])}; measured: train {rates['train_tokens_per_s']:,.0f}, "
            f"prefill {rates['prefill_tokens_per_s']:,.0f}, sample {rates['sample_tokens_per_s']:,.0f} tokens/s"
            f"{_turn_rates(tokens.get('turns'), rates)}{_probe_shape(rates)})"
        )
    return lines


def _probe_shape(rates: dict[str, float]) -> str:
    """What the training rate was timed on, where the probe says (the run's steps are extrapolated from it)."""
    if "probe_train_sequences" not in rates:
        return ""
    return (
        f"; training timed on {rates['probe_train_sequences']:.0f} sequences of {rates['probe_length']:.0f} "
        "tokens, the run's steps extrapolated per token"
    )


def _turn_rates(turns: dict[str, int] | None, rates: dict[str, float]) -> str:
    """The probed latency of a turn, where the turns in a row bound the time."""
    if not turns or "turn_request_s" not in rates:
        return ""
    one_turn = turns_seconds(SequentialTurns(**turns), rates) / max(1, turns["count"])
    return f"; a turn {one_turn:.2f} s, {turns['count']:,} turns in a row"
