"""The C allocator's policy in the engine process: give freed tensor memory back to the system.

torch allocates CPU tensors with glibc's malloc. glibc raises its mmap threshold each time a large mmapped block
is freed (up to 32 MB), so after the first 128 MB logits chunk every activation of a training step comes from
the heap arenas, and the freed memory stays there: the engine's resident size between training steps grew from
1.1 GB (model loaded) to 2.8-3.1 GB during the default run, and its peak to 3.2-3.8 GB (BENCHMARKS.md).
A fixed threshold keeps large tensors in their own mappings, returned to the system when freed; a trim after
each compute job returns what the arenas still hold (the smaller allocations). Elsewhere than glibc: no-op.
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
# Blocks from this size up get their own mapping; smaller ones are reused from the heap. Each fresh mapping
# costs page faults when first written, so the threshold trades speed for memory. The default run on 2 cores
# (bf16, GOMP_SPINCOUNT=1000, one run each, BENCHMARKS.md): glibc's dynamic threshold 146 s wall and an engine
# peak of 3549 MB; 4 MiB 168 s / 3299 MB; 1 MiB 162 s / 3021 MB; 512 KiB 168 s / 2894 MB; 128 KiB 179 s /
# 2887 MB. Activations of SmolLM2-135M are 64 KiB to a few MB per tensor at 1024-token micro-batches.
MMAP_THRESHOLD_BYTES = 512 * 1024
# Sampling keeps far less alive than a training step (its KV cache and one decode step's logits) and allocates
# the same shapes at every decode step, so there the heap's reuse is worth more than the memory it holds until
# the trim after the job: 64 concurrent SDK requests x 64 tokens, 143 tok/s at 512 KiB, 188 with glibc's
# dynamic threshold (BENCHMARKS.md). 32 MiB is the ceiling of that dynamic threshold.
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
    """Fix the mmap threshold for the rest of the process; True when the allocator is glibc's.

    POSTTRAIN_MMAP_THRESHOLD (bytes; 0: glibc's own dynamic threshold, faster and larger) overrides it."""
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
