"""Load: the engine serves 200 concurrent sampling requests while a training run goes on, without errors and
without its memory growing without bound (a second identical wave must not grow it further)."""

from __future__ import annotations

import asyncio

import tinker
from tinker import types

WAVE = 200


def _rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        line = next(line for line in f if line.startswith("VmRSS:"))
    return int(line.split()[1]) / 1024


def _datums(n: int = 4, length: int = 24) -> list[types.Datum]:
    out = []
    for i in range(n):
        tokens = [(100 + 37 * (i + k)) % 40_000 + 100 for k in range(length + 1)]
        out.append(
            types.Datum(
                model_input=types.ModelInput.from_ints(tokens[:-1]),
                loss_fn_inputs={"target_tokens": tokens[1:], "weights": [1.0] * length},
            )
        )
    return out


async def _wave(
    service: tinker.ServiceClient, model: str, training: tinker.TrainingClient
) -> tuple[int, int]:
    sampler = await service.create_sampling_client(base_model=model)
    params = types.SamplingParams(max_tokens=8, temperature=1.0)

    async def sample(i: int) -> int:
        prompt = types.ModelInput.from_ints([1, 504 + i % 50, 3458, 314, 260])
        reply = await sampler.sample(prompt, num_samples=1, sampling_params=params)
        return len(reply.sequences[0].tokens)

    async def train(steps: int) -> int:
        for _ in range(steps):
            fwd = training.forward_backward(_datums(), loss_fn="cross_entropy")
            opt = training.optim_step(types.AdamParams(learning_rate=1e-3))
            await fwd.result_async()
            await opt.result_async()
        return steps

    results = await asyncio.gather(train(3), *(sample(i) for i in range(WAVE)))
    return results[0], sum(1 for n in results[1:] if 1 <= n <= 8)


def test_two_hundred_concurrent_samples_during_training(engine, tiny_model, services):
    service = services(base_url=engine.url)
    training = service.create_lora_training_client(base_model=tiny_model, rank=4)
    steps, served = asyncio.run(_wave(service, tiny_model, training))
    assert (steps, served) == (3, WAVE)
    after_first = _rss_mb(engine.proc.pid)
    steps, served = asyncio.run(_wave(service, tiny_model, training))
    assert (steps, served) == (3, WAVE)
    after_second = _rss_mb(engine.proc.pid)
    # Caches and queues are bounded: a second identical wave must not need much more memory than the first.
    assert after_second < after_first * 1.15 + 100, (after_first, after_second)
