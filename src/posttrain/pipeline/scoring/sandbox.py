"""Run untrusted Python (model-written code) under bubblewrap, with limits, and read back a bounded output.

Why bubblewrap: it is a small, well-kept, daemon-less tool from the distribution (Debian's `bubblewrap`, the
sandbox of Flatpak), so it works on a laptop and in CI where Docker (the cookbook's SandboxFusion) does not.

What the sandboxed program gets:
- its own user, pid, network, ipc, uts and cgroup namespaces (`--unshare-all`): no network at all (not even
  loopback to the host), no view of or signals to host processes; `--die-with-parent` and the pid namespace
  mean every process it starts dies with it;
- a read-only root built from `/usr` (and the interpreter's own prefix, when it lives elsewhere), a private
  8 MiB tmpfs at `/tmp`, and the program's files read-only at `/sandbox`. Nothing else of the host file system
  is mounted: no home directory, no project directory (so no `.env`), no `/etc`;
- an empty environment (`--clearenv`) and a new session (no terminal to inject into);
- rlimits set inside, before the untrusted code runs (so the counts are per-sandbox, see `_PRELUDE`): address
  space, CPU seconds, processes, file size, open files, no core dumps;
- a wall-clock timeout enforced from outside (SIGKILL to bwrap, which takes the namespace down) and a cap on
  the output read back (a program printing forever cannot fill the host's memory).
"""

from __future__ import annotations

import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from posttrain.errors import ConfigError

NOBODY = 65534
# Installing a system package needs root: without sudo the command fails for most users.
INSTALL_HINT = (
    "install it with: sudo apt-get install -y bubblewrap (Debian/Ubuntu) or "
    "sudo dnf install -y bubblewrap (Fedora)"
)


@dataclass(frozen=True)
class Limits:
    timeout_s: float = 5.0
    memory_bytes: int = 512 * 2**20
    processes: int = 16
    file_bytes: int = 2**20
    tmpfs_bytes: int = 8 * 2**20
    open_files: int = 64
    max_output_bytes: int = 256 * 2**10


@dataclass(frozen=True)
class RunResult:
    returncode: int | None  # None: killed on timeout
    output: str  # stdout and stderr together, at most Limits.max_output_bytes
    timed_out: bool
    truncated: bool
    seconds: float


# Runs first inside the sandbox, as the interpreter's own code. RLIMIT_NPROC is set here, inside the new user
# namespace, rather than on bwrap: the kernel then counts only this sandbox's processes against it (and a
# non-root user's other processes do not count), and as the sandbox has no capabilities it cannot raise it.
_PRELUDE = """\
import resource as _r, sys as _s
for _k, _v in (("RLIMIT_AS", {memory}), ("RLIMIT_CPU", {cpu}), ("RLIMIT_NPROC", {nproc}),
               ("RLIMIT_FSIZE", {fsize}), ("RLIMIT_NOFILE", {nofile}), ("RLIMIT_CORE", 0)):
    _r.setrlimit(getattr(_r, _k), (_v, _v))
del _r, _k, _v
_s.argv = ["/sandbox/main.py"]
_s.path.insert(0, "/sandbox")
exec(compile(open("/sandbox/main.py").read(), "/sandbox/main.py", "exec"), {{"__name__": "__main__"}})
"""


def bwrap_path() -> str:
    """The bwrap binary, or a one-line error naming the missing tool and how to install it."""
    path = shutil.which("bwrap")
    if path is None:
        raise ConfigError(f"code execution needs bubblewrap (bwrap), which is not installed; {INSTALL_HINT}")
    return path


def check_available() -> None:
    """Fail fast (one line) if bubblewrap is missing or cannot create its namespaces on this machine."""
    bwrap = bwrap_path()
    result = run_python("print('ok')", Limits(timeout_s=10))
    if result.returncode != 0 or "ok" not in result.output:
        detail = result.output.strip().splitlines()[-1:] or ["no output"]
        raise ConfigError(
            f"bubblewrap ({bwrap}) cannot start a sandbox here: {detail[0]} "
            "(user namespaces may be disabled: sysctl kernel.unprivileged_userns_clone=1)"
        )


def _interpreter() -> tuple[str, list[str]]:
    """The Python to run inside (the base interpreter, never the project's virtual environment) and the extra
    read-only mounts it needs."""
    # The system Python under /usr needs no extra mount (and is readable by `nobody`, see _run); the harness
    # needs only the standard library, so any Python 3 will do.
    system = shutil.which("python3", path="/usr/bin:/bin")
    if system:
        return system, []
    base = Path(sys.base_prefix)
    exe = base / "bin" / f"python{sys.version_info.major}.{sys.version_info.minor}"
    if not exe.exists():
        exe = Path(os.path.realpath(sys.executable))
    return str(exe), ["--ro-bind", str(base), str(base)]


def _root_mounts() -> list[str]:
    args = ["--ro-bind", "/usr", "/usr"]
    for name in ("bin", "sbin", "lib", "lib32", "lib64", "libx32"):
        host = Path("/") / name
        if host.is_symlink():  # merged /usr: recreate the link, mount nothing more
            args += ["--symlink", os.readlink(host), str(host)]
        elif host.is_dir():
            args += ["--ro-bind", str(host), str(host)]
    return args


def command(workdir: Path, limits: Limits) -> list[str]:
    exe, interpreter_mounts = _interpreter()
    prelude = _PRELUDE.format(
        memory=limits.memory_bytes,
        cpu=max(1, int(limits.timeout_s) + 1),
        nproc=limits.processes,
        fsize=limits.file_bytes,
        nofile=limits.open_files,
    )
    return [
        bwrap_path(),
        "--unshare-all",
        "--die-with-parent",
        "--new-session",
        "--clearenv",
        "--setenv",
        "PATH",
        "/usr/bin:/bin",
        "--setenv",
        "HOME",
        "/tmp",
        "--setenv",
        "PYTHONDONTWRITEBYTECODE",
        "1",
        "--hostname",
        "sandbox",
        *_root_mounts(),
        *interpreter_mounts,
        "--proc",
        "/proc",
        "--dev",
        "/dev",
        "--size",
        str(limits.tmpfs_bytes),
        "--tmpfs",
        "/tmp",
        "--ro-bind",
        str(workdir),
        "/sandbox",
        "--remount-ro",
        "/",
        "--chdir",
        "/tmp",
        exe,
        "-I",
        "-S",
        "-c",
        prelude,
    ]


def run_python(main: str, limits: Limits | None = None, files: dict[str, str] | None = None) -> RunResult:
    """Run `main` (Python source) in a fresh sandbox, with `files` beside it in /sandbox (read-only)."""
    limits = limits or Limits()
    workdir = Path(tempfile.mkdtemp(prefix="posttrain-sandbox-"))
    try:
        workdir.chmod(0o755)  # readable by the unprivileged user the sandbox runs as when we are root
        for name, text in {"main.py": main, **(files or {})}.items():
            (workdir / name).write_text(text)
            (workdir / name).chmod(0o644)
        return _run(command(workdir, limits), limits)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _run(argv: list[str], limits: Limits) -> RunResult:
    started = time.monotonic()
    proc = subprocess.Popen(
        argv,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,  # a signal to our process group never reaches it, and it can be killed alone
        # The kernel exempts uid 0 from RLIMIT_NPROC (even mapped into a user namespace), so a fork bomb run as
        # root would not be stopped: as root, the sandbox runs as `nobody`.
        **({"user": NOBODY, "group": NOBODY, "extra_groups": []} if os.geteuid() == 0 else {}),
    )
    assert proc.stdout is not None
    chunks: list[bytes] = []
    size, timed_out, truncated = 0, False, False
    deadline = started + limits.timeout_s
    fd = proc.stdout.fileno()
    try:
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                timed_out = True
                break
            ready, _, _ = select.select([fd], [], [], left)
            if not ready:
                continue
            chunk = os.read(fd, 65536)
            if not chunk:
                break  # the program closed its output: it has ended (or is about to)
            chunks.append(chunk[: limits.max_output_bytes - size])
            size += len(chunk)
            if size >= limits.max_output_bytes:
                truncated = True
                break
        if timed_out or truncated:
            _kill(proc)
        try:
            proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            timed_out = True
            _kill(proc)
    finally:
        if proc.poll() is None:
            _kill(proc)
        proc.stdout.close()
    return RunResult(
        returncode=None if timed_out else proc.returncode,
        output=b"".join(chunks).decode("utf-8", errors="replace"),
        timed_out=timed_out,
        truncated=truncated,
        seconds=round(time.monotonic() - started, 3),
    )


def _kill(proc: subprocess.Popen) -> None:
    # bwrap is the group leader; killing it makes the kernel kill the namespace's init (--die-with-parent),
    # and with it every process inside.
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()
