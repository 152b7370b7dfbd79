"""User verifiers (`reward_fn=`) run in worker processes with a wall-clock timeout: a call that sleeps forever or
busy-loops scores 0 with "timed out after N s", its worker is killed (no process is left behind), the next call
works, and a worker never outlives the run. The cost of a call through the pool is measured (printed with -s)."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from posttrain.pipeline.scoring.verifiers import UserVerifier

VERIFIER = """
import os, time

def ok(row, completion):
    return 1.0 if completion else 0.0

def sleepy(row, completion):
    open(row["pidfile"], "w").write(str(os.getpid()))
    time.sleep(10**6)

def spin(row, completion):
    open(row["pidfile"], "w").write(str(os.getpid()))
    while True:
        pass
"""


@pytest.fixture
def verifier_file(tmp_path: Path) -> Path:
    path = tmp_path / "v.py"
    path.write_text(VERIFIER)
    return path


def _gone(pid: int, within: float) -> bool:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        try:  # a killed child of ours stays a zombie until the pool reaps it: count that as gone
            if Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z":
                return True
        except FileNotFoundError:
            return True
        time.sleep(0.05)
    return False


@pytest.mark.parametrize("name", ["sleepy", "spin"])
def test_a_hanging_verifier_times_out_scores_zero_and_its_worker_is_killed(
    verifier_file: Path, tmp_path: Path, name: str
):
    errors = tmp_path / "verifier_errors.jsonl"
    hanging = UserVerifier(f"{verifier_file}:{name}", errors, timeout=1)
    ok = UserVerifier(f"{verifier_file}:ok", errors, timeout=1)

    async def run() -> tuple[tuple[float, str | None], float, tuple[float, str | None]]:
        start = time.monotonic()
        result = await hanging.score({"pidfile": str(tmp_path / "pid")}, "x", "train")
        return result, time.monotonic() - start, await ok.score({}, "x", "train")

    (reward, error), took, after = asyncio.run(run())
    assert reward == 0.0 and error == f"{verifier_file}: timed out after 1 s (the call was stopped)"
    assert 0.9 < took < 5
    assert _gone(int((tmp_path / "pid").read_text()), within=5)  # the stuck worker was killed
    assert after == (1.0, None)  # the pool replaced it
    assert "timed out after 1 s" in errors.read_text()


def test_a_call_through_the_worker_pool_costs_about_a_millisecond(verifier_file: Path):
    ok = UserVerifier(f"{verifier_file}:ok", timeout=10)
    row = {"question": "What is 2 + 2?", "answer": "4"}

    async def run(n: int) -> tuple[float, float]:
        await ok.score(row, "4", "train")  # the pool starts on first use
        start = time.perf_counter()
        for _ in range(n):
            assert await ok.score(row, "The answer is 4", "train") == (1.0, None)
        sequential = (time.perf_counter() - start) / n
        start = time.perf_counter()
        await asyncio.gather(*(ok.score(row, "The answer is 4", "train") for _ in range(n)))
        return sequential, (time.perf_counter() - start) / n

    sequential, concurrent = asyncio.run(run(200))
    print(
        f"verifier call: {sequential * 1e3:.2f} ms one at a time, {concurrent * 1e3:.2f} ms each concurrently"
    )
    assert sequential < 0.05 and concurrent < 0.05  # ~1 ms and ~0.4 ms on 2 shared cores


def test_a_busy_worker_does_not_outlive_a_killed_run(verifier_file: Path, tmp_path: Path):
    script = tmp_path / "run.py"
    script.write_text(
        textwrap.dedent(
            f"""
            import asyncio
            from posttrain.pipeline.scoring.verifiers import UserVerifier

            if __name__ == "__main__":
                v = UserVerifier("{verifier_file}:spin", timeout=600)
                asyncio.run(v.score({{"pidfile": "{tmp_path / "pid"}"}}, "x", "train"))
            """
        )
    )
    proc = subprocess.Popen([sys.executable, str(script)])
    try:
        deadline = time.monotonic() + 60
        while not (tmp_path / "pid").exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        worker = int((tmp_path / "pid").read_text())
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert _gone(worker, within=5), "the verifier's worker kept spinning after the run was killed"


def test_a_verifier_that_does_not_compile_is_reported_at_its_own_line(tmp_path: Path) -> None:
    from posttrain.errors import ConfigError
    from posttrain.pipeline.scoring.verifiers import load

    bad = tmp_path / "bad.py"
    bad.write_text("import math\n\ndef score(row, completion)\n    return 1.0\n")
    with pytest.raises(ConfigError) as caught:
        load(f"{bad}:score")
    assert (
        str(caught.value)
        == f"reward_fn={bad}:score: importing {bad} failed: {bad}:3: SyntaxError: expected ':'"
    )


def test_the_same_relative_spec_in_two_directories_calls_each_directorys_file(tmp_path: Path, monkeypatch):
    """Two runs in one process (from Python), each with `reward_fn=check.py:score` in its own directory: the worker
    pool outlives the first run and keeps its working directory, yet each run gets its own file's function, and a
    file edited between runs is read again."""
    for value in ("0.25", "0.75"):
        folder = tmp_path / value
        folder.mkdir()
        (folder / "check.py").write_text(f"def score(row, completion):\n    return {value}\n")
        monkeypatch.chdir(folder)
        verifier = UserVerifier("check.py:score")
        assert asyncio.run(verifier.score({}, "x", "test")) == (float(value), None)
    (folder / "check.py").write_text("def score(row, completion):\n    return 0.5\n")
    os.utime(folder / "check.py", ns=(time.time_ns(), time.time_ns() + 10**9))  # a newer modification time
    assert asyncio.run(UserVerifier("check.py:score").score({}, "x", "test")) == (0.5, None)
