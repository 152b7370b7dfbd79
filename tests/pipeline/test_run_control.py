"""Runs stopped part-way, by killing real processes: the engine dies, the pipeline gets SIGTERM or SIGKILL;
`resume=true` continues a stopped run; inputs that can be checked before anything is spent fail fast."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from runs import FINISHED, REPO, read_jsonl, train_here, without_guard


@pytest.fixture(scope="module")
def pairs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("data") / "pairs.jsonl"
    rows = [{"prompt": f"Say the number {i}.", "completion": f"Number {i}. Done."} for i in range(60)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _args(pairs: Path, model: str, run_name: str, epochs: int = 3) -> list[str]:
    return [
        f"dataset={pairs}",
        f"model_name={model}",
        "renderer_name=role_colon",
        "learning_rate=0.01",
        "batch_size=8",
        f"num_epochs={epochs}",
        "save_every=5",
        "eval_every=0",
        "lora_rank=4",
        "backend=local",
        f"run_name={run_name}",
    ]


def _start(
    args: list[str], cwd: Path, sigint_ignored: bool = False, extra_env: dict[str, str] | None = None
) -> subprocess.Popen[str]:
    env = {**os.environ, "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    env.update(extra_env or {})
    return subprocess.Popen(
        [sys.executable, str(REPO / "train.py"), *without_guard(args)],
        cwd=cwd,
        env=env,
        # As a shell script's background job (`train.py &`) starts: with SIGINT ignored.
        preexec_fn=(lambda: signal.signal(signal.SIGINT, signal.SIG_IGN)) if sigint_ignored else None,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _run(args: list[str], cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess[str]:
    proc = _start(args, cwd)
    out, err = proc.communicate(timeout=timeout)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def _wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def _engine_pids(parent: int) -> list[int]:
    """The engine processes started by `parent` (its children running posttrain.engine.serve)."""
    out = subprocess.run(
        ["pgrep", "-P", str(parent), "-f", "posttrain.engine.serve"], capture_output=True, text=True
    )
    return [int(p) for p in out.stdout.split()]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is dead too: it only waits for its parent to read its status.
    with open(f"/proc/{pid}/stat") as f:
        return f.read().split(")")[-1].split()[0] != "Z"


def _checkpoint_saved(log_dir: Path) -> bool:
    file = log_dir / "checkpoints.jsonl"
    return file.is_file() and "state_path" in file.read_text()


def test_engine_killed_mid_training_then_resumed(tmp_path: Path, tiny_model: str, pairs: Path) -> None:
    log_dir = tmp_path / "results" / "logs" / "r1"
    proc = _start(_args(pairs, tiny_model, "r1", epochs=40), tmp_path)
    _wait_for(lambda: _checkpoint_saved(log_dir), 300, "the first checkpoint")
    (engine_pid,) = _engine_pids(proc.pid)
    os.kill(engine_pid, signal.SIGKILL)
    killed = time.monotonic()
    out, err = proc.communicate(timeout=60)
    assert time.monotonic() - killed < 30  # the SDK alone would retry for minutes
    assert proc.returncode == 2
    assert err.strip().splitlines()[-1].startswith("error: the local engine stopped during the run")
    assert "engine.log" in err and "Traceback" not in err
    assert "resume=true" in out and "run_name=r1" in out
    partial = json.loads((tmp_path / "results" / "summary.json").read_text())
    assert partial["status"] == "failed" and partial["run_name"] == "r1" and partial["baseline"] is not None
    steps_before = [json.loads(line)["step"] for line in (log_dir / "metrics.jsonl").read_text().splitlines()]
    # The last checkpoint is damaged on disk meanwhile (a truncated copy): the run goes back to the one before.
    from posttrain.engine.models import cache_root

    saved = [json.loads(line) for line in (log_dir / "checkpoints.jsonl").read_text().splitlines()]
    run_id, _, name = saved[-1]["state_path"].removeprefix("tinker://").partition("/weights/")
    adapter = cache_root() / "checkpoints" / run_id / "weights" / name / "adapter.safetensors"
    adapter.write_bytes(adapter.read_bytes()[:100])

    resumed = _run([*_args(pairs, tiny_model, "r1", epochs=40), "resume=true", "max_steps=12"], tmp_path)
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-2000:]
    assert "evaluated before the interruption" in resumed.stdout
    before = f"checkpoint {saved[-2]['name']}" if len(saved) > 1 else "the start"
    damaged = f"checkpoint {name} is damaged ({adapter}: its contents differ from what was saved (SHA-256))"
    assert f"training: {damaged}; continuing from {before}" in resumed.stdout, resumed.stdout
    assert [r["name"] for r in read_jsonl(log_dir / "checkpoints_damaged.jsonl")] == [name]
    steps = [json.loads(line)["step"] for line in (log_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(12)) and len(steps_before) >= 5  # one run: earlier steps kept, none repeated
    summary = json.loads((tmp_path / "results" / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["baseline_nll"] == pytest.approx(partial["baseline"])
    assert not (tmp_path / "results" / "previous").exists()  # nothing moved aside on resume


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_stopping_the_pipeline_stops_its_engine(tmp_path: Path, tiny_model: str, pairs: Path, sig) -> None:
    # SIGTERM: sent to a background job, which inherited SIGINT ignored (SIGTERM used to do nothing then).
    proc = _start(_args(pairs, tiny_model, "s1", epochs=40), tmp_path, sigint_ignored=sig == signal.SIGTERM)
    _wait_for(lambda: (tmp_path / "results" / "logs" / "s1" / "metrics.jsonl").is_file(), 300, "training")
    (engine_pid,) = _engine_pids(proc.pid)
    if sig == signal.SIGKILL:
        # A second run into the same folder stops in one line naming the first, and moves nothing of it aside.
        second = _run(_args(pairs, tiny_model, "s2", epochs=40), tmp_path, timeout=120)
        assert second.returncode == 2 and "Traceback" not in second.stderr
        assert second.stderr.strip().splitlines() == [
            f"error: results_dir=results: run s1 (process {proc.pid}, started "
            + second.stderr.split("started ", 1)[1].split(")", 1)[0]
            + ") is writing there; wait for it to end, or give this run a results_dir= of its own"
        ]
        assert (
            not (tmp_path / "results" / "previous").exists()
            and not (tmp_path / "results" / "logs" / "s2").exists()
        )
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=60)
    _wait_for(lambda: not _alive(engine_pid), 30, "the engine to stop")
    if sig == signal.SIGTERM:
        assert proc.returncode == 130 and "Traceback" not in err
        assert json.loads((tmp_path / "results" / "summary.json").read_text())["status"] == "failed"
        assert "resume=true" in out


def test_inputs_checked_before_anything_is_spent(tmp_path: Path, pairs: Path) -> None:
    results = tmp_path / "results"
    results.mkdir()
    (results / "summary.json").write_text('{"run_name": "earlier"}\n')
    cases = [
        (["backend=local", "base_url=http://127.0.0.1:9"], "http://127.0.0.1:9 cannot be reached"),
        (["resume=true", "run_name=never-ran"], "no run 'never-ran' to continue"),
        (["resume=true"], "resume=true needs run_name"),
        (["env=reasoning_gym:no_such_task"], "reasoning_gym:no_such_task"),
        ([f"dataset={pairs}", "task=rl"], "env=math needs a dataset with question/answer"),
    ]
    for args, needle in cases:
        proc = train_here([f"dataset={pairs}", *args] if "dataset=" not in " ".join(args) else args, tmp_path)
        assert proc.returncode == 2, (args, proc.stdout, proc.stderr)
        assert needle in proc.stderr and "Traceback" not in proc.stderr, (args, proc.stderr)
        assert len(proc.stderr.strip().splitlines()) == 1, (args, proc.stderr)
    assert sorted(p.name for p in results.iterdir()) == ["summary.json"]  # nothing moved, nothing written

    blocked = tmp_path / "blocked"
    blocked.write_text("a file where the results folder should be")
    proc = train_here([f"dataset={pairs}", f"results_dir={blocked}"], tmp_path)
    assert proc.returncode == 2 and "exists and is not a directory" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_a_stopped_dry_run_says_it_wrote_nothing(tmp_path: Path, tiny_model: str, pairs: Path) -> None:
    temp = tmp_path / "tmp"  # the system temp folder, where the plan keeps its logs while it runs
    temp.mkdir()
    args = [*_args(pairs, tiny_model, "d1"), "dry_run=true"]
    proc = _start(args, tmp_path, extra_env={"TMPDIR": str(temp)})
    assert proc.stdout is not None
    for line in proc.stdout:
        if line.startswith("plan: sft on backend local"):
            break
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "Traceback" not in err, err
    assert err.strip().splitlines()[-1] == "interrupted: nothing was written (a dry run writes no results)"
    assert not (tmp_path / "results").exists()
    assert list(temp.iterdir()) == []  # nor anything in the temp folder


@pytest.mark.parametrize("stop", ["finished", "interrupted", "failed"])
def test_a_dry_run_leaves_only_a_failed_plans_engine_log(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, stop: str
) -> None:
    import tempfile

    from posttrain.pipeline import run, session
    from posttrain.pipeline.console import CONSOLE
    from posttrain.pipeline.settings import method_config, parse_train_args

    temp = tmp_path / "tmp"
    temp.mkdir()
    monkeypatch.setenv("TMPDIR", str(temp))
    monkeypatch.setattr(tempfile, "tempdir", None)  # read TMPDIR again
    monkeypatch.setattr(CONSOLE, "verbose", True)  # the terminal stays pytest's: no capture into console.log
    monkeypatch.setattr(run.plan, "plan_lines", lambda outcome: [])
    said: list[str] = []
    monkeypatch.setattr(run, "say", said.append)

    async def plan_run(state, method) -> dict:
        (state.log_path / "console.log").write_text("library output\n")
        (state.log_path / "engine.log").write_text("engine: out of memory\n")
        (state.log_path / "data").mkdir()
        (state.log_path / "data" / "train.jsonl").write_text("{}\n")
        if stop == "interrupted":
            raise KeyboardInterrupt  # Ctrl-C
        if stop == "failed":
            raise RuntimeError(f"the local engine stopped; see {state.log_path / 'engine.log'}")
        return {}

    monkeypatch.setattr(session, "plan_run", plan_run)
    cfg = method_config(parse_train_args(["run_name=p", "dry_run=true"]), "sft")
    if stop == "finished":
        assert run._dry_run(cfg, "local", "sft", None, None)["dry_run"] is True  # type: ignore[arg-type]
    else:
        with pytest.raises(KeyboardInterrupt if stop == "interrupted" else RuntimeError):
            run._dry_run(cfg, "local", "sft", None, None)  # type: ignore[arg-type]
    left = [p for p in temp.rglob("*") if p.is_file()]
    if stop == "failed":  # the log its error points to, and only that
        assert [p.name for p in left] == ["engine.log"]
        assert said[-1] == f"plan: failed; the local engine's log is kept: {left[0]}"
    else:
        assert list(temp.iterdir()) == []


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 24 MB filesystem of its own (tmpfs), so that the test can fill it."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=24m", "tmpfs", str(disk)], capture_output=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        yield disk
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


def _fill(disk: Path) -> Path:
    filler = disk / "filler"
    with open(filler, "wb") as f:
        try:
            while True:
                f.write(b"\0" * (1 << 20))
                f.flush()
        except OSError:
            pass
    return filler


def test_a_full_disk_stops_the_run_in_one_line_and_it_resumes(
    small_disk: Path, engine, tiny_model: str, pairs: Path
) -> None:
    args = [
        *_args(pairs, tiny_model, "full", epochs=40),
        f"base_url={engine.url}",
        f"results_dir={small_disk}/results",
    ]
    args.remove("backend=local")
    proc = _start(args, small_disk.parent)
    log_dir = small_disk / "results" / "logs" / "full"
    _wait_for(lambda: _checkpoint_saved(log_dir), 300, "the first checkpoint")
    base_rows = (small_disk / "results" / "base_model.jsonl").read_text()
    filler = _fill(small_disk)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 2 and "Traceback" not in err, err[-3000:]
    line = err.strip().splitlines()[-1]
    assert line.startswith(f"error: {small_disk}/results") and ": no space left on the device (" in line, line
    assert "MB free there); what was written before is intact" in line
    assert (small_disk / "results" / "base_model.jsonl").read_text() == base_rows  # intact
    assert "resume=true" in out

    filler.unlink()
    resumed = _run([*args, "resume=true", "max_steps=12"], small_disk.parent)
    assert resumed.returncode in FINISHED, resumed.stdout[-2000:] + resumed.stderr[-2000:]
    assert "continuing from step" in resumed.stdout
    summary = json.loads((small_disk / "results" / "summary.json").read_text())
    assert summary["status"] == "completed"


def test_a_request_the_service_refuses_is_one_line(
    tmp_path: Path, engine, tiny_model: str, pairs: Path
) -> None:
    missing = "tinker://nobody:train:0/weights/000001"
    args = [*_args(pairs, tiny_model, "refused"), f"base_url={engine.url}", f"load_checkpoint_path={missing}"]
    args.remove("backend=local")
    proc = _run(args, tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    console_log = tmp_path / "results" / "logs" / "refused" / "console.log"
    assert proc.stderr.strip().splitlines()[-1] == (
        f"error: the service refused a request: checkpoint {missing} not found "
        f"(the full error: {console_log.relative_to(tmp_path)})"
    )
    assert "Traceback" in console_log.read_text()  # kept for whoever debugs it
