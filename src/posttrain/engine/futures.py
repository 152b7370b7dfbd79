"""Futures: every long operation answers its POST with a request id that the client long-polls."""

from __future__ import annotations

import asyncio
import itertools
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

PROTOBUF = "application/x-protobuf"
LONG_POLL_SECONDS = 25.0  # below the SDK's 45 s per-attempt timeout, so a poll never times out client-side


@dataclass
class Future:
    request_id: str
    done: asyncio.Event = field(default_factory=asyncio.Event)
    payload: Any = None  # JSON-able dict, or protobuf bytes
    error: str | None = None
    category: str = "user"

    def set_result(self, payload: Any) -> None:
        self.payload = payload
        self.done.set()

    def set_error(self, message: str, category: str = "user") -> None:
        self.error = message
        self.category = category
        self.done.set()


class FutureStore:
    """Futures by id, plus the idempotency index: a retried request gets its original future back."""

    def __init__(self, keep_done: int = 20_000):
        self._ids = itertools.count(1)
        self._futures: OrderedDict[str, Future] = OrderedDict()
        self._by_key: dict[tuple, str] = {}
        self._keep_done = keep_done

    def create(self, key: tuple | None = None) -> tuple[Future, bool]:
        """Return (future, is_new). With a key already seen, the original future and False."""
        if key is not None and key in self._by_key:
            existing = self._futures.get(self._by_key[key])
            if existing is not None:
                return existing, False
        future = Future(request_id=str(next(self._ids)))
        self._futures[future.request_id] = future
        if key is not None:
            self._by_key[key] = future.request_id
        self._trim()
        return future, True

    def get(self, request_id: str) -> Future | None:
        return self._futures.get(request_id)

    def _trim(self) -> None:
        # Results are kept after retrieval (clients may poll again); only the oldest finished ones are dropped.
        while len(self._futures) > self._keep_done:
            oldest_id, oldest = next(iter(self._futures.items()))
            if not oldest.done.is_set():
                break
            del self._futures[oldest_id]

    async def wait(self, future: Future, timeout: float = LONG_POLL_SECONDS) -> bool:
        try:
            await asyncio.wait_for(future.done.wait(), timeout)
        except TimeoutError:
            return False
        return True
