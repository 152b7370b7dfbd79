"""The engine's allocator policy: memory a job frees goes back to the system (engine/allocator.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

# Run in a fresh process, as the engine does (configure() first): in a process whose heap already holds free
# chunks, glibc serves even large requests from them, and the numbers would depend on the tests run before.
SCENARIO = r"""
import json, re
from pathlib import Path
import torch
from posttrain.engine import allocator

def rss():
    return int(re.search(r"^VmRSS:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M).group(1)) / 1024

configured = allocator.configure()
# Under glibc's default policy, freeing this raises the mmap threshold to 16 MB: the 3 MB blocks below then
# come from the heap and stay in the process once freed (+180 MB), until the trim.
big = torch.ones(16 << 20, dtype=torch.uint8)
del big
before = rss()
blocks = [torch.ones(3 << 20, dtype=torch.uint8) for _ in range(60)]  # 180 MB of activation-sized tensors
# Larger than any free chunk, so carved from the heap's top, which then stays in use: no automatic trim.
keep = torch.ones(4 << 20, dtype=torch.uint8)
held = rss()
del blocks
freed = rss()
small = [torch.ones(64 << 10, dtype=torch.uint8) for _ in range(2000)]  # 128 MB under any threshold: heap
keep2 = torch.ones(1000)
del small
allocator.trim()
print(json.dumps({"configured": configured, "before": before, "held": held, "freed": freed, "trimmed": rss()}))
"""


def _scenario(script: str, threshold: str | None = None) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "POSTTRAIN_MMAP_THRESHOLD"}
    if threshold is not None:
        env["POSTTRAIN_MMAP_THRESHOLD"] = threshold
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc, /proc")
def test_by_default_the_heap_is_reused_within_a_job_and_returned_after_it():
    mb = _scenario(SCENARIO)
    assert not mb["configured"]  # glibc's own policy
    assert mb["held"] - mb["before"] > 150, mb
    # glibc keeps up to twice its raised threshold (32 MB) free at the heap's top for the next allocations.
    assert mb["freed"] - mb["before"] > 30, f"freed blocks were not kept for reuse: {mb}"
    assert mb["trimmed"] - mb["before"] < 30, f"the trim after the job did not return them: {mb}"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc, /proc")
def test_a_fixed_threshold_returns_freed_activations_at_once():
    mb = _scenario(SCENARIO, threshold=str(512 * 1024))
    assert mb["configured"]
    assert mb["held"] - mb["before"] > 150, mb
    assert mb["freed"] - mb["before"] < 30, f"freed tensors were kept: {mb}"
    assert mb["trimmed"] - mb["before"] < 30, f"freed small blocks were kept after the trim: {mb}"


def test_a_bad_mmap_threshold_is_a_one_line_error(monkeypatch: pytest.MonkeyPatch) -> None:
    from posttrain.engine import allocator
    from posttrain.errors import UserError

    monkeypatch.setenv("POSTTRAIN_MMAP_THRESHOLD", "lots")
    with pytest.raises(UserError, match=r"POSTTRAIN_MMAP_THRESHOLD='lots': expected a number of bytes"):
        allocator.configure()


SAMPLING_SCENARIO = r"""
import json, re, threading
from pathlib import Path
import torch
from posttrain.engine import allocator

def rss():
    return int(re.search(r"^VmRSS:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M).group(1)) / 1024

def churn():
    blocks = [torch.ones(3 << 20, dtype=torch.uint8) for _ in range(60)]
    # Larger than any free chunk, so carved from the heap's top, which then stays in use: no automatic trim.
    keep = torch.ones(4 << 20, dtype=torch.uint8)
    del blocks
    return keep

def sample():  # as the engine samples: on a thread of its own, so in a heap arena of its own
    global keep, sampling_kept
    with allocator.for_sampling():
        keep = churn()
        sampling_kept = rss()  # reused from the heap: still resident until the trim

assert allocator.configure()
before = rss()
thread = threading.Thread(target=sample)
thread.start()
thread.join()
allocator.trim()
trimmed = rss()
keep2 = churn()
training_kept = rss()  # the training threshold again: own mappings, gone when freed
print(json.dumps({"before": before, "sampling": sampling_kept, "trimmed": trimmed, "training": training_kept}))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc, /proc")
def test_with_a_fixed_threshold_sampling_reuses_the_heap_and_training_gets_it_back():
    mb = _scenario(SAMPLING_SCENARIO, threshold=str(512 * 1024))
    assert mb["sampling"] - mb["before"] > 150, f"sampling's freed blocks were not kept for reuse: {mb}"
    assert mb["trimmed"] - mb["before"] < 30, f"the trim after the job did not return them: {mb}"
    assert mb["training"] - mb["before"] < 30, f"freed tensors were kept after sampling: {mb}"
