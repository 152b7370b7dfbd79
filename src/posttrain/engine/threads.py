"""`--threads 0` (adaptive): how many threads each compute job uses: every processor, less what other processes
demand while we compute. Not the default: a job's thread count changes its bf16 results, so with it the same
run gives different numbers on a busy machine (the default is every processor, fixed: `compute`).

OpenMP teams wait for every member at each parallel region; when other processes take the cores, a member
descheduled from its core stalls the whole team (measured on a loaded 2-core machine: 2.3 s per training step
on 1 thread, 30 s on 2 threads with libgomp's default spin-waiting; see BENCHMARKS.md). Waiting threads spin
briefly, then sleep (set by `serve`), and each job's thread count follows the demand of other processes.

That demand is measured from CPU time, not sampled at the instant a job starts: the earlier policy read the
runnable count of /proc/loadavg when a job began, and the client that had just sent the request was still
running then, so in the default run most training steps ran on one of two idle cores (15.9 s per step instead
of 9.5 s). Here the other processes' CPU time during the previous job (from /proc/stat over the processors
this process may use, less this process's own time) gives their demand; one competing thread is tolerated
(with brief waiting, 2 threads beside one busy process still match or beat 1 thread: BENCHMARKS.md).
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass

# A job shorter than this says little: CPU times tick at 10 ms.
MIN_MEASURED_SECONDS = 0.5
# The machine counts as saturated when this close to every processor being busy.
SATURATION_MARGIN = 0.15


def available_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


@dataclass(frozen=True)
class CpuTimes:
    wall: float
    busy: float  # seconds of CPU time, all processes, over the processors this process may use
    own: float  # this process's CPU time (every thread)


def cpu_times() -> CpuTimes | None:
    """The current readings, or None where /proc/stat is not available (not Linux)."""
    try:
        allowed = {f"cpu{i}" for i in os.sched_getaffinity(0)}
        with open("/proc/stat") as f:
            lines = f.read().splitlines()
    except (OSError, AttributeError):
        return None
    ticks = os.sysconf("SC_CLK_TCK")
    busy = 0
    for line in lines:
        name, *fields = line.split()
        if name in allowed:
            values = [int(v) for v in fields[:8]]
            # user nice system idle iowait irq softirq steal: everything but idle and iowait is busy
            busy += sum(values) - values[3] - values[4]
    own = os.times()
    return CpuTimes(wall=time.monotonic(), busy=busy / ticks, own=own.user + own.system)


def others_demand(start: CpuTimes, end: CpuTimes, our_threads: int, cpus: int) -> float | None:
    """Threads' worth of CPU that other processes wanted between two readings; None if too short to tell.

    When every processor was busy, the scheduler shared them among our threads and theirs, so they got
    cpus * d / (our_threads + d) cores for a demand d: solve for d. Otherwise they got all they wanted.
    """
    wall = end.wall - start.wall
    if wall < MIN_MEASURED_SECONDS:
        return None
    theirs = max(0.0, (end.busy - start.busy) - (end.own - start.own)) / wall
    total = (end.busy - start.busy) / wall
    if total < cpus - SATURATION_MARGIN or theirs >= cpus - SATURATION_MARGIN:
        return theirs
    return theirs * our_threads / (cpus - theirs)


def threads_for(demand: float, limit: int) -> int:
    """Every processor, less the ones other processes' demand fills, tolerating one competing thread."""
    taken = max(0, math.ceil(demand - 0.05) - 1)  # 0.05: rounding noise of 10 ms ticks
    return max(1, min(limit, limit - taken))


class ThreadPolicy:
    """Per-job thread counts for one compute thread: `before_job()` gives the count, `after_job()` measures."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.threads = limit  # until a job has been measured: nothing is known of the others
        self.demand: float | None = None
        self._start: CpuTimes | None = None
        self._cpus = available_cpus()

    def before_job(self) -> int:
        self._start = cpu_times()
        return self.threads

    def after_job(self) -> None:
        end = cpu_times()
        if self._start is None or end is None:
            return
        demand = others_demand(self._start, end, self.threads, self._cpus)
        if demand is not None:
            self.demand = demand
            self.threads = threads_for(demand, self.limit)
