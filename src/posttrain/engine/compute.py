"""The engine's one compute thread: every torch computation runs on it, with the thread count the load allows.

Under OpenMP each thread that computes keeps a thread pool of its own, and with more pool threads than processors
libgomp hardly spins before sleeping: with a second, idle pool alive, 40 prompt scorings took 8.1-8.5 s instead of
5.1-5.2 s (BENCHMARKS.md section 00). So there is one thread, and torch's thread count (per thread) is set on it.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch

from posttrain.engine import allocator
from posttrain.engine.threads import ThreadPolicy, available_cpus

logger = logging.getLogger(__name__)

STOP_GRACE_SECONDS = 5.0  # on shutdown, how long a running compute job may take to finish


class ComputeThread:
    def __init__(self, threads: int | None, device: torch.device) -> None:
        # A fixed count (every processor unless --threads N) by default: reductions split by thread, so a bf16
        # result depends on the count, and a run must not change with the machine's load. --threads 0: adaptive
        # (engine/threads.py).
        self.threads = threads if threads and threads > 0 else available_cpus()
        adaptive = threads == 0 and device.type == "cpu"
        self.policy = ThreadPolicy(self.threads) if adaptive else None
        self._executor = ThreadPoolExecutor(
            max_workers=1,
            thread_name_prefix="engine-compute",
            initializer=torch.set_num_threads,
            initargs=(self.threads,),
        )
        self._running: concurrent.futures.Future | None = None

    def call(self, fn: Callable[[], Any]) -> Any:
        """Run `fn` on the compute thread and wait (model loading, before the server starts)."""
        return self._executor.submit(fn).result()

    async def run(self, fn: Callable[[], Any], what: str) -> Any:
        self._running = self._executor.submit(self._with_threads, fn, what)
        return await asyncio.wrap_future(self._running)

    def busy(self) -> bool:
        """Whether a job is still running."""
        return self._running is not None and not self._running.done()

    async def stop(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
        # Let a job that is about to finish (a checkpoint being written) complete, but never wait for a long
        # generation or training step: checkpoints are renamed into place, so exiting mid-job is safe.
        deadline = time.monotonic() + STOP_GRACE_SECONDS
        while self.busy() and time.monotonic() < deadline:
            await asyncio.sleep(0.05)

    def _with_threads(self, fn: Callable[[], Any], what: str) -> Any:
        if self.policy is not None:
            n = self.policy.before_job()
            if n != torch.get_num_threads():
                logger.info(
                    "compute threads: %d (other processes' demand: %.2f cores)", n, self.policy.demand or 0.0
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
            if self.policy is not None:
                self.policy.after_job()
            # What the job freed goes back to the system, so the engine's size between jobs stays that of the
            # model (and a later job's peak starts from there).
            allocator.trim()
