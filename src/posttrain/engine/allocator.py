"""The C allocator's policy in the engine process: what a compute job freed goes back to the system after it.

torch allocates CPU tensors with glibc's malloc. glibc's own policy stands by default: its mmap threshold rises
(up to 32 MB) as large blocks are freed, so a training step's activations are reused from the heap instead of
being mapped and faulted in afresh (on the development machine's VM a fresh 4 KiB page cost 3.5 us: with a
512 KiB threshold, page faults took a third of the engine's CPU time). A trim after each compute job returns
what the heap holds free, so the engine's size between jobs stays that of the model. Training steps run packed
micro-batches of a few repeating shapes (`packing.micro_batches`), which keeps the heap's high-water mark near
what a step uses: the default run's engine peaks at 2.5 GB (BENCHMARKS.md section 000). POSTTRAIN_MMAP_THRESHOLD (bytes)
fixes a threshold instead, for less memory at a cost in speed. Elsewhere than glibc: no-op.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import logging
import os
from collections.abc import Iterator

from posttrain.errors import UserError

logger = logging.getLogger(__name__)

_M_TRIM_THRESHOLD = -1  # glibc's mallopt parameter numbers
_M_MMAP_THRESHOLD = -3
_DEFAULT_TRIM_THRESHOLD = 128 * 1024  # glibc's
# 0: glibc's dynamic threshold. A fixed one puts blocks from that size up in their own mappings, returned to the
# system when freed and faulted in again when next allocated: the default run on 2 cores (bf16, before packed
# micro-batches, BENCHMARKS.md section 0): dynamic 146 s wall, engine peak 3549 MB; 4 MiB 168 s / 3299 MB;
# 512 KiB 168 s / 2894 MB. With packed micro-batches (section 00): dynamic 137 s / 2613 MB.
MMAP_THRESHOLD_BYTES = 0
# Where a threshold is fixed, sampling still reuses the heap: it keeps far less alive than a training step (its
# KV cache and one decode step's logits) and allocates the same shapes at every decode step: 64 concurrent SDK
# requests x 64 tokens, 143 tok/s at 512 KiB, 188 with glibc's dynamic threshold (BENCHMARKS.md). 32 MiB is the
# ceiling of that dynamic threshold. (Sampling and training share the engine's one compute thread, hence one heap
# arena: after a sampling job's trim, training-sized blocks were seen to stay resident in 2 of 4 runs of a probe.)
SAMPLING_MMAP_THRESHOLD_BYTES = 32 * 1024 * 1024

_configured: list[int] = []  # the threshold configure() set (empty: not glibc, or glibc's own policy)


@functools.cache
def _glibc() -> ctypes.CDLL | None:
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
        libc.malloc_trim.argtypes = [ctypes.c_size_t]
        return libc
    except (OSError, AttributeError):  # not glibc (macOS, musl): its allocator keeps its own policy
        return None


def configure() -> bool:
    """Fix the mmap threshold POSTTRAIN_MMAP_THRESHOLD asks for (bytes; 0, the default: glibc's own dynamic
    threshold); True when one was fixed."""
    value = os.environ.get("POSTTRAIN_MMAP_THRESHOLD", str(MMAP_THRESHOLD_BYTES))
    if not value.strip().isdigit():
        raise UserError(
            f"POSTTRAIN_MMAP_THRESHOLD={value!r}: expected a number of bytes (0: glibc's own policy)"
        )
    threshold = int(value)
    libc = _glibc()
    if libc is None:
        return False
    if threshold <= 0:
        return False
    if libc.mallopt(_M_MMAP_THRESHOLD, threshold) != 1:
        logger.info("mallopt(M_MMAP_THRESHOLD) refused; freed memory stays in the heap")
        return False
    _configured[:] = [threshold]
    return True


@contextlib.contextmanager
def for_sampling() -> Iterator[None]:
    """Within: the sampling threshold (where configure() fixed one); the training one again after."""
    libc = _glibc()
    if libc is None or not _configured:
        yield
        return
    libc.mallopt(_M_MMAP_THRESHOLD, SAMPLING_MMAP_THRESHOLD_BYTES)
    # Nor does free() hand the heap's top back mid-job (to be faulted in again at the next step): trim() does,
    # after the job.
    libc.mallopt(_M_TRIM_THRESHOLD, 1 << 30)
    try:
        yield
    finally:
        libc.mallopt(_M_MMAP_THRESHOLD, _configured[0])
        libc.mallopt(_M_TRIM_THRESHOLD, _DEFAULT_TRIM_THRESHOLD)


def trim() -> None:
    """Return the free memory the heap arenas hold to the system (a few ms)."""
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)
