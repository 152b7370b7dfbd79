"""The engine's allocator policy: memory a job frees goes back to the system (engine/allocator.py)."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
import torch

from posttrain.engine import allocator

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc, /proc")


def _rss_mb() -> float:
    status = Path("/proc/self/status").read_text()
    return int(re.search(r"^VmRSS:\s+(\d+) kB", status, re.M).group(1)) / 1024


def test_freed_activations_and_small_blocks_leave_the_process():
    assert allocator.configure()
    # Under glibc's default policy, freeing this raises the mmap threshold to 16 MB: the 3 MB blocks below
    # would then come from the heap and stay in the process once freed (measured: +180 MB kept).
    big = torch.ones(16 << 20, dtype=torch.uint8)
    del big
    before = _rss_mb()
    blocks = [torch.ones(3 << 20, dtype=torch.uint8) for _ in range(60)]  # 180 MB of activation-sized tensors
    keep = torch.ones(1000)  # allocated after them: the heap's top is in use, so no automatic trim
    held = _rss_mb()
    del blocks
    freed = _rss_mb()
    assert held - before > 150
    assert freed - before < 30, f"RSS {before:.0f} -> {held:.0f} -> {freed:.0f} MB: freed tensors were kept"
    # Blocks under the threshold come from the heap; the trim after each job returns them.
    small = [torch.ones(64 << 10, dtype=torch.uint8) for _ in range(2000)]  # 128 MB
    keep2 = torch.ones(1000)
    del small
    allocator.trim()
    assert _rss_mb() - before < 30
    del keep, keep2
