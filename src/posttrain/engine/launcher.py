"""Start the engine in a subprocess on a free loopback port, wait until it is ready, stop it cleanly."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path

from posttrain.engine.serve import READY_PREFIX
from posttrain.errors import UserError


@dataclass(frozen=True)
class ServeOptions:
    """The `posttrain serve` options a launched engine gets (see `serve.build_parser`)."""

    models: list[str] | None = None  # None: the default model
    checkpoint_dir: str | Path | None = None
    dtype: str = "auto"
    api_key: str | None = None
    port: int = 0
    threads: int | None = None

    def argv(self) -> list[str]:
        args = ["--host", "127.0.0.1", "--port", str(self.port), "--dtype", self.dtype]
        for model in self.models or []:
            args += ["--model", model]
        if self.checkpoint_dir is not None:
            args += ["--checkpoint-dir", str(self.checkpoint_dir)]
        if self.api_key:
            args += ["--api-key", self.api_key]
        if self.threads:
            args += ["--threads", str(self.threads)]
        return args


class EngineProcess:
    def __init__(
        self,
        options: ServeOptions | None = None,
        log_file: str | Path | None = None,
        env: dict[str, str] | None = None,
    ):
        self.args = [sys.executable, "-m", "posttrain.engine.serve", *(options or ServeOptions()).argv()]
        self.env = {**os.environ, **(env or {})}
        self.log_file = Path(log_file) if log_file else None
        self.url: str | None = None
        self.proc: subprocess.Popen[str] | None = None
        self._tail: deque[str] = deque(maxlen=40)

    def start(self, timeout: float = 600.0) -> str:
        """Start the server and wait until it is ready; return its URL."""
        self.spawn()
        return self.wait_ready(timeout)

    def spawn(self) -> None:
        """Start the server process. Call it from the thread that lives as long as the server should: on
        Linux the server is told to stop when that thread ends, so a killed client leaves no orphan."""
        self.proc = subprocess.Popen(
            self.args,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=self.env,
            bufsize=1,
            preexec_fn=_stop_with_parent if sys.platform == "linux" else None,
        )
        self._ready = threading.Event()
        log = open(self.log_file, "a") if self.log_file else None  # noqa: SIM115 - closed by the reader thread

        def read() -> None:
            assert self.proc is not None and self.proc.stdout is not None
            for line in self.proc.stdout:
                self._tail.append(line.rstrip())
                if log:
                    log.write(line)
                    log.flush()
                if line.startswith(READY_PREFIX) and not self._ready.is_set():
                    self.url = line[len(READY_PREFIX) :].split()[0]
                    self._ready.set()
            if log:
                log.close()

        threading.Thread(target=read, daemon=True).start()

    def wait_ready(self, timeout: float = 600.0) -> str:
        """Block until the spawned server prints its ready line; return its URL."""
        assert self.proc is not None, "spawn() first"
        ready = self._ready
        deadline = time.monotonic() + timeout
        while not ready.wait(0.2):
            if self.proc.poll() is not None:
                detail = " | ".join(list(self._tail)[-3:])
                raise UserError(f"the local engine exited with code {self.proc.returncode}: {detail}")
            if time.monotonic() > deadline:
                self.stop()
                raise UserError(f"the local engine was not ready after {timeout:.0f} s")
        assert self.url is not None
        return self.url

    def stop(self, timeout: float = 20.0) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def restart(self, timeout: float = 600.0) -> str:
        """Stop the server and start it again with the same arguments (a new port when it was 0)."""
        self.stop()
        self.url = None
        return self.start(timeout)

    def __enter__(self) -> EngineProcess:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _stop_with_parent() -> None:
    """In the child, before exec: ask the kernel for SIGTERM when the parent (thread) dies (PR_SET_PDEATHSIG)."""
    import ctypes

    pr_set_pdeathsig = 1
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)
