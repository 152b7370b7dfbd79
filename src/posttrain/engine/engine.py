"""Engine state and scheduling: sessions, the training queue, the sampling batches, the one compute thread.

Training requests run in arrival order, which is the SDK's submission order (it sends request k+1 only after
request k's POST has returned). The one exception, forward_backward chunks of one call posted in parallel,
only accumulates gradients, which commutes. Sampling requests for one sampler decode together, and those that
arrive while that batch decodes join it at the next decode step (continuous batching), unless a training
request is waiting. Each compute job runs on a fixed thread count (every processor; `--threads 0`: adaptive to
the load, see `compute`, `threads`).
What the requests act on (models, runs, samplers, checkpoints) is `weights.Weights`.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import traceback
import uuid
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from posttrain.engine import allocator
from posttrain.engine.compute import ComputeThread
from posttrain.engine.errors import WireError
from posttrain.engine.futures import Future, FutureStore
from posttrain.engine.models import ModelSource
from posttrain.engine.sampling import DecodeLoop, Decoding, GenerationRequest, GenerationResult
from posttrain.engine.seeding import SampleSeeds, derive, session_seed, split_session
from posttrain.engine.stability import SampledRecord, session_of
from posttrain.engine.weights import Sampler, Weights, load_models
from posttrain.engine.wire import encode_sample_response, sequence_id

logger = logging.getLogger(__name__)

SAMPLE_GATHER_SECONDS = 0.005  # let concurrent asample POSTs that arrive together share one batch


@dataclass(eq=False)
class PendingSample:
    future: Future
    sampler: Sampler
    request: GenerationRequest


class Engine:
    def __init__(
        self,
        sources: list[ModelSource],
        checkpoint_dir: Path,
        dtype: torch.dtype,
        threads: int | None = None,
        device: torch.device | str = "cpu",
    ):
        device = torch.device(device)
        allocator.configure()  # before the models load: their conversion's temporaries go back too
        self.compute = ComputeThread(threads, device)
        self.threads = self.compute.threads
        # Model loading runs on the compute thread too: its OpenMP pool is the one every job reuses.
        self.weights = Weights(self.compute.call(lambda: load_models(sources, dtype, device)), checkpoint_dir)
        self.futures = FutureStore()
        self.sessions: dict[str, dict[str, Any]] = {}
        self.sample_seeds = SampleSeeds()
        self._train_queue: deque[tuple[Future, Callable[[], Any]]] = deque()
        self._sample_queue: list[PendingSample] = []
        self._sample_lock = threading.Lock()  # the compute thread takes requests that join a running batch
        self._wake: asyncio.Event | None = None
        self._loop_task: asyncio.Task | None = None

    # lifecycle ---------------------------------------------------------------------------------------------------
    async def start(self) -> None:
        self._wake = asyncio.Event()
        self._loop_task = asyncio.create_task(self._scheduler())

    async def stop(self) -> None:
        if self._loop_task is not None:
            self._loop_task.cancel()
        await self.compute.stop()

    def busy(self) -> bool:
        """Whether the compute thread is still running a job."""
        return self.compute.busy()

    def new_session(self, tags: list) -> str:
        session_id = f"s{uuid.uuid4().hex[:12]}"
        self.sessions[session_id] = {
            "created": time.time(),
            "tags": tags,
            "last": time.time(),
            "seed": session_seed(tags),
        }
        return session_id

    def seed_of(self, object_id: str) -> int | None:
        """The `seed=N` tag of the session a model, sampler or session id belongs to (engine/seeding.py)."""
        return self.sessions.get(split_session(object_id)[0], {}).get("seed")

    def lora_seed(self, session_id: str, model_seq_id: Any) -> int | None:
        """The LoRA initialisation seed of a create_model request that gave none."""
        seed = self.seed_of(str(session_id))
        return derive(seed, "lora", model_seq_id) if seed is not None else None

    # scheduling --------------------------------------------------------------------------------------------------
    def submit_training(self, key: tuple | None, fn: Callable[[], Any]) -> Future:
        future, new = self.futures.create(key)
        if new:
            self._train_queue.append((future, fn))
            self._poke()
        return future

    def submit_sample(
        self, key: tuple | None, sampler: Sampler, request: GenerationRequest
    ) -> tuple[Future, bool]:
        future, new = self.futures.create(key)
        if new:
            if request.spec.seed is None and (seed := self.seed_of(sampler.sampler_id)) is not None:
                # Only a new request counts: a retry (same key) must not shift the seeds of later ones.
                drawn = self.sample_seeds.seed_for(seed, sampler.sampler_id, request.prompt_key)
                request.spec = replace(request.spec, seed=drawn)
            with self._sample_lock:
                self._sample_queue.append(PendingSample(future, sampler, request))
            self._poke()
        return future, new

    def _poke(self) -> None:
        if self._wake is not None:
            self._wake.set()

    async def _scheduler(self) -> None:
        assert self._wake is not None
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._train_queue or self._sample_queue:
                if self._train_queue:
                    future, fn = self._train_queue.popleft()
                    await self._run_job(future, fn)
                if self._sample_queue:
                    await asyncio.sleep(SAMPLE_GATHER_SECONDS)
                    await self._run_sample_batch()

    async def _run_job(self, future: Future, fn: Callable[[], Any]) -> None:
        # The route's job function (`forward_backward.<locals>.work`) names the request in the log.
        kind = getattr(fn, "__qualname__", "job").split(".", 1)[0]
        await self._settle([future], lambda: [fn()], f"request {future.request_id} ({kind})")

    async def _settle(
        self, futures: Sequence[Future], fn: Callable[[], list[Any]], what: str, only_errors: bool = False
    ) -> None:
        """Run `fn` on the compute thread; give each future its result, or every unanswered future the error.

        With `only_errors`, `fn` answers the futures itself; they get an error only if `fn` fails."""
        try:
            results = await self.compute.run(fn, what)
        except WireError as exc:
            for future in futures:
                if not future.done.is_set():
                    future.set_error(str(exc), "user")
        except Exception as exc:  # noqa: BLE001 - the server must survive anything a request triggers
            logger.error("%s failed:\n%s", what, traceback.format_exc())
            for future in futures:
                if not future.done.is_set():
                    future.set_error(internal_error(exc), "server")
        else:
            if only_errors:
                return
            for future, result in zip(futures, results, strict=True):
                future.set_result(result)

    # sampling batches --------------------------------------------------------------------------------------------
    def _take_samples(self, key: tuple) -> list[PendingSample]:
        """Remove and return the queued sampling requests for one set of weights (any thread)."""
        with self._sample_lock:
            batch = [p for p in self._sample_queue if p.sampler.weights_key == key]
            self._sample_queue = [p for p in self._sample_queue if p.sampler.weights_key != key]
        return batch

    async def _run_sample_batch(self) -> None:
        """Decode every queued request for one sampler (= one set of weights) together, continuously.

        Requests for the same weights that arrive while the batch decodes join it at the next decode step,
        and each request is answered as soon as its own samples are done. Joining stops while a training
        request waits, so sampling never starves training; the rest of the batch then finishes first.
        """
        with self._sample_lock:
            first = self._sample_queue[0].sampler
        batch = self._take_samples(first.weights_key)
        futures = [p.future for p in batch]
        answer = _answerer(asyncio.get_running_loop())

        def more() -> list[PendingSample]:
            joining = [] if self._train_queue else self._take_samples(first.weights_key)
            futures.extend(p.future for p in joining)
            return joining

        def work() -> list[None]:
            snapshot = self.weights.snapshot(first)
            with allocator.for_sampling(), first.base.sampling_model(snapshot) as module:
                base = first.base
                decoding = Decoding(base.eos_token_ids, base.dtype, base.max_context, base.tokenizer)
                decoder = DecodeLoop(module, decoding)
                self._decode(decoder, batch, answer, more)
            return [None] * len(futures)

        await self._settle(futures, work, "sampling batch", only_errors=True)

    def _decode(
        self,
        decoder: DecodeLoop,
        waiting: list[PendingSample],
        answer: _Answer,
        more: Callable[[], list[PendingSample]],
    ) -> None:
        while True:
            for pending in waiting:
                try:
                    decoder.add(pending, pending.request)
                except ValueError as exc:
                    answer(pending.future, None, str(exc))
            if decoder.idle:
                return
            for pending, result in decoder.step().items():
                assert isinstance(pending, PendingSample)
                self._record_for_stability(pending, result)
                sequences = [(s.tokens, s.logprobs, s.stop_reason) for s in result.sequences]
                answer(pending.future, encode_sample_response(sequences, result.prompt_logprobs), None)
            waiting = more()

    def _record_for_stability(self, pending: PendingSample, result: GenerationResult) -> None:
        if not pending.request.record_stability:
            return
        session = session_of(pending.sampler.sampler_id)
        for i, seq in enumerate(result.sequences):
            record = SampledRecord(session, pending.request.prompt_tokens, seq.tokens, seq.logprobs)
            self.weights.stability.add(sequence_id(pending.future.request_id, i), record)


_Answer = Callable[[Future, "bytes | None", "str | None"], None]


def _answerer(loop: asyncio.AbstractEventLoop) -> _Answer:
    """Answer a future from the compute thread, on the event loop's thread."""

    def answer(future: Future, payload: bytes | None, error: str | None) -> None:
        if error is not None:
            loop.call_soon_threadsafe(future.set_error, error, "user")
        else:
            loop.call_soon_threadsafe(future.set_result, payload)

    return answer


def internal_error(exc: Exception) -> str:
    """What a client is told about a failure that is the engine's fault, not the request's."""
    return f"internal error in the local engine: {type(exc).__name__}: {exc}"
