"""Engine state and scheduling: sessions, training runs, samplers, and the single compute thread.

Training requests run in arrival order, which is the SDK's submission order (it sends request k+1 only after
request k's POST has returned). The one exception, forward_backward chunks of one call posted in parallel,
only accumulates gradients, which commutes. Sampling requests for one sampler decode together, and those that
arrive while that batch decodes join it at the next decode step (continuous batching), unless a training
request is waiting. Each compute job sets the thread count the machine's load allows (`threads.ThreadPolicy`).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
import time
import traceback
import uuid
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from posttrain.engine import allocator, runtime
from posttrain.engine.checkpoints import CheckpointRef, CheckpointStore, check_name, parse_tinker_path
from posttrain.engine.futures import Future, FutureStore
from posttrain.engine.models import ModelSource
from posttrain.engine.runtime import LoraSpec, ServedModel, Snapshot, SnapshotCache, TrainingRun
from posttrain.engine.sampling import DecodeLoop, GenerationRequest, GenerationResult
from posttrain.engine.stability import SampledRecord, StabilityRecords, session_of
from posttrain.engine.threads import ThreadPolicy, available_cpus
from posttrain.engine.wire import (
    FwdBwdRequest,
    WireError,
    encode_forward_backward_output,
    encode_sample_response,
    sequence_id,
)
from posttrain.util import iso_time

logger = logging.getLogger(__name__)

SAMPLE_GATHER_SECONDS = 0.005  # let concurrent asample POSTs that arrive together share one batch
STOP_GRACE_SECONDS = 5.0  # on shutdown, how long a running compute job may take to finish


@dataclass
class Sampler:
    sampler_id: str
    base: ServedModel
    model_path: str | None
    snapshot_key: str | None  # None: the base model


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
        self.dtype = dtype
        self.device = torch.device(device)
        allocator.configure()  # before the models load: their conversion's temporaries go back too
        # A fixed count (--threads N), or adaptive up to every processor: see engine/threads.py.
        self.threads = threads if threads and threads > 0 else available_cpus()
        self.thread_policy = None if threads and threads > 0 else ThreadPolicy(self.threads)
        # Every torch computation of the engine runs on this one thread, model loading included. Under OpenMP
        # each thread that computes keeps a thread pool of its own, and with more pool threads than processors
        # libgomp hardly spins before sleeping: with a second, idle pool alive, 40 prompt scorings took 8.1-8.5 s
        # instead of 5.1-5.2 s (BENCHMARKS.md section 00). torch's thread count is per thread too: set there.
        self._executor = ThreadPoolExecutor(
            max_workers=1,
            thread_name_prefix="engine-compute",
            initializer=torch.set_num_threads,
            initargs=(self.threads,),
        )
        self.models: dict[str, ServedModel] = self._executor.submit(self._load, sources).result()
        self.store = CheckpointStore(checkpoint_dir)
        self.futures = FutureStore()
        self.sessions: dict[str, dict[str, Any]] = {}
        self.runs: dict[str, TrainingRun] = {}
        self.samplers: dict[str, Sampler] = {}
        self.snapshots = SnapshotCache()
        self.stability = StabilityRecords()
        self._train_queue: deque[tuple[Future, Callable[[], Any]]] = deque()
        self._sample_queue: list[PendingSample] = []
        self._sample_lock = threading.Lock()  # the compute thread takes requests that join a running batch
        self._wake: asyncio.Event | None = None
        self._loop_task: asyncio.Task | None = None
        self._running: concurrent.futures.Future | None = None

    def _load(self, sources: list[ModelSource]) -> dict[str, ServedModel]:
        models = {}
        for source in sources:
            logger.info("loading %s from %s (%s on %s)", source.name, source.path, self.dtype, self.device)
            models[source.name] = ServedModel(source, self.dtype, self.device)
        return models

    # lifecycle --------------------------------------------------------------------------------------------
    async def start(self) -> None:
        self._wake = asyncio.Event()
        self._loop_task = asyncio.create_task(self._scheduler())

    async def stop(self) -> None:
        if self._loop_task is not None:
            self._loop_task.cancel()
        self._executor.shutdown(wait=False, cancel_futures=True)
        # Let a job that is about to finish (a checkpoint being written) complete, but never wait for a long
        # generation or training step: checkpoints are renamed into place, so exiting mid-job is safe.
        deadline = time.monotonic() + STOP_GRACE_SECONDS
        while self.busy() and time.monotonic() < deadline:
            await asyncio.sleep(0.05)

    def busy(self) -> bool:
        """Whether the compute thread is still running a job."""
        return self._running is not None and not self._running.done()

    async def _compute(self, fn: Callable[[], Any], what: str) -> Any:
        self._running = self._executor.submit(self._with_threads, fn, what)
        return await asyncio.wrap_future(self._running)

    def _with_threads(self, fn: Callable[[], Any], what: str) -> Any:
        """Run a job on the compute thread with the thread count the machine's load allows now."""
        policy = self.thread_policy if self.device.type == "cpu" else None
        if policy is not None:
            n = policy.before_job()
            if n != torch.get_num_threads():
                logger.info(
                    "compute threads: %d (other processes' demand: %.2f cores)", n, policy.demand or 0.0
                )
                torch.set_num_threads(n)
        started = time.perf_counter()
        try:
            return fn()
        finally:
            # Per-job durations make a slow run explainable from engine.log alone.
            logger.info(
                "%s: %.2f s on %d threads", what, time.perf_counter() - started, torch.get_num_threads()
            )
            if policy is not None:
                policy.after_job()
            # What the job freed goes back to the system, so the engine's size between jobs stays that of the
            # model (and a later job's peak starts from there).
            allocator.trim()

    def model(self, name: str | None) -> ServedModel:
        if name is None or name not in self.models:
            raise WireError(
                f"model {name!r} is not served by this engine; available: {', '.join(self.models)}"
            )
        return self.models[name]

    def run(self, model_id: str) -> TrainingRun:
        run = self.runs.get(model_id)
        if run is None:
            raise WireError(
                f"unknown model_id {model_id!r} (training runs live until the server stops; "
                "resume from a checkpoint with create_training_client_from_state)"
            )
        return run

    def new_session(self, tags: list) -> str:
        session_id = f"s{uuid.uuid4().hex[:12]}"
        self.sessions[session_id] = {
            "created": time.time(),
            "tags": tags,
            "last": time.time(),
        }
        return session_id

    # scheduling ----------------------------------------------------------------------------------------------
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
        self,
        futures: Sequence[Future],
        fn: Callable[[], list[Any]],
        what: str,
        only_errors: bool = False,
    ) -> None:
        """Run `fn` on a compute thread; give each future its result, or every unanswered future the error.

        With `only_errors`, `fn` answers the futures itself; they get an error only if `fn` fails."""
        try:
            results = await self._compute(fn, what)
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

    def _take_samples(self, key: tuple) -> list[PendingSample]:
        """Remove and return the queued sampling requests for one set of weights (any thread)."""
        with self._sample_lock:
            batch = [p for p in self._sample_queue if (p.sampler.base.name, p.sampler.snapshot_key) == key]
            self._sample_queue = [
                p for p in self._sample_queue if (p.sampler.base.name, p.sampler.snapshot_key) != key
            ]
        return batch

    async def _run_sample_batch(self) -> None:
        """Decode every queued request for one sampler (= one set of weights) together, continuously.

        Requests for the same weights that arrive while the batch decodes join it at the next decode step,
        and each request is answered as soon as its own samples are done. Joining stops while a training
        request waits, so sampling never starves training; the rest of the batch then finishes first.
        """
        with self._sample_lock:
            first = self._sample_queue[0].sampler
        key = (first.base.name, first.snapshot_key)
        batch = self._take_samples(key)
        loop = asyncio.get_running_loop()
        futures = [p.future for p in batch]

        def answer(future: Future, payload: bytes | None = None, error: str | None = None) -> None:
            if error is not None:
                loop.call_soon_threadsafe(future.set_error, error, "user")
            else:
                loop.call_soon_threadsafe(future.set_result, payload)

        def work() -> list[None]:
            snapshot = self._snapshot(first)
            with allocator.for_sampling(), first.base.sampling_model(snapshot) as module:
                decoder = DecodeLoop(
                    module,
                    tokenizer=first.base.tokenizer,
                    eos_token_ids=first.base.eos_token_ids,
                    compute_dtype=first.base.dtype,
                    max_context=first.base.max_context,
                )
                waiting = list(batch)
                while True:
                    for pending in waiting:
                        try:
                            decoder.add(pending, pending.request)
                        except ValueError as exc:
                            answer(pending.future, error=str(exc))
                    if decoder.idle:
                        break
                    for pending, result in decoder.step().items():
                        assert isinstance(pending, PendingSample)
                        self._record_for_stability(pending, result)
                        answer(
                            pending.future,
                            encode_sample_response(
                                [(s.tokens, s.logprobs, s.stop_reason) for s in result.sequences],
                                result.prompt_logprobs,
                            ),
                        )
                    waiting = [] if self._train_queue else self._take_samples(key)
                    futures.extend(p.future for p in waiting)
            return [None] * len(futures)

        await self._settle(futures, work, "sampling batch", only_errors=True)

    def _record_for_stability(self, pending: PendingSample, result: GenerationResult) -> None:
        if not pending.request.record_stability:
            return
        session = session_of(pending.sampler.sampler_id)
        for i, seq in enumerate(result.sequences):
            record = SampledRecord(session, pending.request.prompt_tokens, seq.tokens, seq.logprobs)
            self.stability.add(sequence_id(pending.future.request_id, i), record)

    # training operations (run on the compute thread) -----------------------------------------------------------
    def create_run(
        self, model_id: str, base_model: str, spec: LoraSpec, user_metadata: dict | None
    ) -> TrainingRun:
        base = self.model(base_model)
        if spec.rank < 1 or spec.rank > 512:
            raise WireError(f"lora rank must be between 1 and 512, got {spec.rank}")
        if not (spec.train_attn or spec.train_mlp or spec.train_unembed):
            raise WireError("at least one of train_attn, train_mlp, train_unembed must be true")
        adapter = f"run{len(self.runs)}-{uuid.uuid4().hex[:6]}"
        base.add_adapter(adapter, spec)
        run = TrainingRun(
            run_id=model_id,
            base=base,
            spec=spec,
            adapter=adapter,
            optimizer=runtime.new_optimizer(base.adapter_params(adapter)),
            user_metadata={str(k): str(v) for k, v in (user_metadata or {}).items()},
        )
        self.runs[model_id] = run
        self.store.write_run(model_id, run.info())
        return run

    def do_forward_backward(self, request: FwdBwdRequest) -> bytes:
        run = self.run(request.model_id)
        outputs, metrics = runtime.forward_backward(run, request, self.stability)
        return encode_forward_backward_output(outputs, metrics)

    def do_optim_step(self, model_id: str, adam: dict) -> dict:
        return {"metrics": runtime.optim_step(self.run(model_id), adam)}

    def _meta(self, run: TrainingRun, extra: dict) -> dict:
        return {"base_model": run.base.name, "lora": run.spec.__dict__, "step": run.steps, **extra}

    def do_save_state(
        self, model_id: str, name: str, ttl: int | None, overwrite: bool, metadata: dict | None
    ) -> dict:
        run = self.run(model_id)
        ref = CheckpointRef(model_id, "weights", check_name(name))
        self.store.save(
            ref,
            run.adapter_state(),
            self._meta(run, {"ttl_seconds": ttl, "user_metadata": metadata or {}}),
            optimizer=run.optimizer.state_dict(),
            overwrite=overwrite,
        )
        return {"path": ref.tinker_path, "type": "save_weights"}

    def do_save_for_sampler(
        self, model_id: str, name: str | None, sampler_seq: int | None, ttl: int | None, metadata: dict | None
    ) -> dict:
        run = self.run(model_id)
        snapshot = Snapshot(run.spec, run.adapter_state())
        if name is None:
            # Ephemeral: kept in memory only, addressed through a sampling session.
            sampler_id = (
                f"{model_id}:sampler:{sampler_seq if sampler_seq is not None else uuid.uuid4().hex[:8]}"
            )
            key = f"ephemeral:{sampler_id}:{time.time_ns()}"
            self.snapshots.put(key, snapshot)
            self.samplers[sampler_id] = Sampler(sampler_id, run.base, None, key)
            return {"sampling_session_id": sampler_id, "type": "save_weights_for_sampler"}
        ref = CheckpointRef(model_id, "sampler_weights", check_name(name))
        self.store.save(
            ref,
            snapshot.weights,
            self._meta(run, {"ttl_seconds": ttl, "user_metadata": metadata or {}}),
            overwrite=True,
        )
        self.snapshots.put(ref.tinker_path, snapshot)
        return {"path": ref.tinker_path, "type": "save_weights_for_sampler"}

    def do_load(
        self,
        model_id: str,
        path: str,
        with_optimizer: bool,
        base_model: str | None,
        user_metadata: dict | None,
    ) -> dict:
        ref = parse_tinker_path(path)
        adapter, meta, optimizer = self.store.load(ref, with_optimizer)
        if base_model and base_model != meta["base_model"]:
            raise WireError(f"{path} was trained on {meta['base_model']}, not {base_model}")
        spec = LoraSpec.from_dict(meta["lora"])
        run = self.runs.get(model_id)
        if run is None:
            run = self.create_run(model_id, meta["base_model"], spec, user_metadata)
        elif run.steps > 0:
            raise WireError("load_weights is only allowed as the first request of a training client")
        from peft.utils import set_peft_model_state_dict

        assert run.base.peft is not None
        set_peft_model_state_dict(run.base.peft, adapter, adapter_name=run.adapter)
        if optimizer is not None:
            run.optimizer.load_state_dict(optimizer)
        run.steps = int(meta.get("step", 0))
        return {"path": path, "model_id": model_id, "type": "load_weights"}

    # samplers --------------------------------------------------------------------------------------------------
    def create_sampler(self, sampler_id: str, base_model: str | None, model_path: str | None) -> Sampler:
        if model_path:
            ref = parse_tinker_path(model_path)
            meta = self.store.meta(ref)
            if base_model and base_model != meta["base_model"]:
                raise WireError(f"{model_path} was trained on {meta['base_model']}, not {base_model}")
            sampler = Sampler(sampler_id, self.model(meta["base_model"]), model_path, ref.tinker_path)
        else:
            sampler = Sampler(sampler_id, self.model(base_model), None, None)
        self.samplers[sampler_id] = sampler
        return sampler

    def _snapshot(self, sampler: Sampler) -> Snapshot | None:
        if sampler.snapshot_key is None:
            return None
        snap = self.snapshots.get(sampler.snapshot_key)
        if snap is not None:
            return snap
        if sampler.snapshot_key.startswith("ephemeral:"):
            raise WireError(
                f"sampler {sampler.sampler_id}: its weights were evicted; save them with a name to keep them"
            )
        ref = parse_tinker_path(sampler.snapshot_key)
        weights, meta, _ = self.store.load(ref, with_optimizer=False)
        snap = Snapshot(LoraSpec.from_dict(meta["lora"]), weights)
        self.snapshots.put(sampler.snapshot_key, snap)
        return snap

    # REST views ------------------------------------------------------------------------------------------------
    def training_run_view(self, run_id: str) -> dict:
        live = self.runs.get(run_id)
        info = live.info() if live else self.store.read_run(run_id)
        if info is None:
            raise KeyError(run_id)
        checkpoints = self.store.list(run_id)
        training = [c for c in checkpoints if c["checkpoint_type"] == "training"]
        sampler = [c for c in checkpoints if c["checkpoint_type"] == "sampler"]
        last = live.last_request if live else info.get("created", time.time())
        return {
            "training_run_id": run_id,
            "base_model": info["base_model"],
            "model_owner": "local",
            "is_lora": True,
            "corrupted": False,
            "lora_rank": info["lora"]["rank"],
            "last_request_time": iso_time(last),
            "last_checkpoint": training[-1] if training else None,
            "last_sampler_checkpoint": sampler[-1] if sampler else None,
            "user_metadata": info.get("user_metadata") or None,
        }

    def run_ids(self) -> list[str]:
        return sorted(set(self.store.list_runs()) | set(self.runs))


def internal_error(exc: Exception) -> str:
    """What a client is told about a failure that is the engine's fault, not the request's."""
    return f"internal error in the local engine: {type(exc).__name__}: {exc}"
