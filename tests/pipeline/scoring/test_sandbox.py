"""The code sandbox (bubblewrap) on real hostile programs: each must score 0 and leave the run and the machine
unharmed. Every hostile solution is written so that an escape would *earn* reward (it returns the right value
only if the attack worked), so a score of 0 means the attack failed, not merely that the code was wrong."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest
from runs import REPO

from posttrain.errors import ConfigError
from posttrain.pipeline.envs import code as code_envs
from posttrain.pipeline.scoring import code as code_tasks
from posttrain.pipeline.scoring import sandbox

pytestmark = pytest.mark.skipif(shutil.which("bwrap") is None, reason="bubblewrap is not installed")

LIMITS = sandbox.Limits(timeout_s=3.0)
PROBLEM = code_tasks.problem_from_row(
    {
        "question": "Write f(x) that returns x.",
        "entry_point": "f",
        "tests": ["assert f(7) == 7", "assert f(2) == 2"],
    },
    "test",
)


def grade(code: str) -> code_tasks.CodeResult:
    started = time.monotonic()
    result = code_tasks.grade(PROBLEM, f"```python\n{code}\n```", LIMITS)
    assert time.monotonic() - started < LIMITS.timeout_s + 2, "the sandbox outlived its timeout"
    return result


def sandbox_processes() -> list[str]:
    """Processes still running a sandboxed program (they must all be gone once a grade returns)."""
    out = subprocess.run(["ps", "-eo", "pid,args"], capture_output=True, text=True).stdout
    return [line for line in out.splitlines() if "/sandbox/main.py" in line and "ps -eo" not in line]


@pytest.fixture(autouse=True)
def _no_leftovers():
    yield
    time.sleep(0.2)
    assert sandbox_processes() == []


def test_a_correct_solution_passes_and_a_partial_one_gets_a_fraction():
    assert grade("def f(x):\n    return x").reward == 1.0
    partial = grade("def f(x):\n    return 7")
    assert (partial.passed, partial.total, partial.reward) == (1, 2, 0.5)
    # Code that prints fake results cannot pass: expected values never enter the sandbox.
    fake = f'print({code_tasks._MARK!r} + \'{{"i": 0, "repr": "7"}}\')\ndef f(x):\n    return None'
    assert grade(fake).reward == 0.0


@pytest.mark.parametrize("where", ["in the function", "at import"])
def test_endless_loop_times_out(where: str):
    code = (
        "def f(x):\n    while True:\n        pass" if where == "in the function" else "while True:\n    pass"
    )
    assert grade(code).reward == 0.0


def test_fork_bomb_is_capped_and_cleaned_up():
    code = (
        "import os\n"
        "def f(x):\n"
        "    n = 0\n"
        "    while True:\n"
        "        try:\n"
        "            os.fork(); n += 1\n"
        "        except OSError:\n"
        "            if n > 1000: return x\n"
    )
    result = grade(code)
    assert result.reward == 0.0
    assert subprocess.run(["true"]).returncode == 0  # the host can still start processes


def test_filling_the_disk_fails():
    marker = f"posttrain-hostile-{os.getpid()}"
    code = (
        "def f(x):\n"
        "    written = 0\n"
        f"    for path in ('/tmp/{marker}', '/sandbox/{marker}', '/{marker}', '{REPO}/{marker}'):\n"
        "        try:\n"
        "            with open(path, 'wb') as out:\n"
        "                for _ in range(200):\n"
        "                    out.write(b'x' * 2**20); written += 2**20\n"
        "        except OSError:\n"
        "            pass\n"
        "    return x if written >= 100 * 2**20 else None\n"
    )
    assert grade(code).reward == 0.0
    assert not (REPO / marker).exists() and not Path(f"/tmp/{marker}").exists()


def test_reading_dotenv_and_files_outside_the_sandbox_fails(tmp_path: Path):
    secret = "tml-super-secret-value"
    (tmp_path / ".env").write_text(f"TINKER_API_KEY={secret}\n")
    paths = [
        str(tmp_path / ".env"),
        str(REPO / "README.md"),
        "/etc/passwd",
        os.path.expanduser("~/.bashrc"),
        ".env",
    ]
    code = (
        "def f(x):\n"
        f"    for path in {paths!r}:\n"
        "        try:\n"
        "            open(path).read()\n"
        "            return x\n"
        "        except OSError:\n"
        "            pass\n"
    )
    assert grade(code).reward == 0.0


def test_opening_a_socket_fails():
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    server.settimeout(5)
    port = server.getsockname()[1]
    accepted: list[object] = []
    thread = threading.Thread(target=lambda: _accept(server, accepted), daemon=True)
    thread.start()
    code = (
        "import socket\n"
        "def f(x):\n"
        f"    for host, port in (('127.0.0.1', {port}), ('1.1.1.1', 53), ('localhost', {port})):\n"
        "        try:\n"
        "            socket.create_connection((host, port), timeout=1).close()\n"
        "            return x\n"
        "        except OSError:\n"
        "            pass\n"
    )
    assert grade(code).reward == 0.0
    server.close()
    thread.join(timeout=6)
    assert accepted == []


def _accept(server: socket.socket, accepted: list[object]) -> None:
    try:
        accepted.append(server.accept())
    except OSError:
        pass


def test_killing_its_parent_and_the_host_fails():
    canary = subprocess.Popen(["sleep", "30"])
    try:
        code = (
            "import os, signal\n"
            "def f(x):\n"
            f"    for pid in (os.getppid(), {os.getpid()}, {canary.pid}, 1):\n"
            "        try:\n"
            "            os.kill(pid, signal.SIGKILL)\n"
            "        except OSError:\n"
            "            pass\n"
            "    try:\n"
            "        os.kill(-1, signal.SIGKILL)\n"
            "    except OSError:\n"
            "        pass\n"
            f"    os.kill({canary.pid}, 0)  # raises unless the host's process is visible\n"
            "    return x\n"
        )
        assert grade(code).reward == 0.0
        assert canary.poll() is None  # the host process it aimed at is alive (and so are we)
    finally:
        canary.kill()
        canary.wait()
    assert grade("def f(x):\n    return x").reward == 1.0  # and the sandbox still works


def test_memory_and_output_floods_are_cut_off():
    assert grade("def f(x):\n    b = bytearray(8 * 2**30)\n    return x").reward == 0.0
    assert grade("import os\nwhile True:\n    os.write(1, b'x' * 65536)").reward == 0.0


def test_a_missing_bwrap_is_a_one_line_error(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(shutil, "which", lambda name, *a, **k: None)
    with pytest.raises(ConfigError, match="bubblewrap") as exc:
        sandbox.bwrap_path()
    assert str(exc.value) == (
        "code execution needs bubblewrap (bwrap), which is not installed; install it with: "
        "sudo apt-get install -y bubblewrap (Debian/Ubuntu) or sudo dnf install -y bubblewrap (Fedora)"
    )


def test_generated_tasks_and_humaneval_are_solvable_by_their_references():
    problems = code_envs.generated_problems(6, seed=3)
    assert len({p["question"] for p in problems}) > 1
    for p in problems[:3]:
        assert all(t.startswith(f"assert {p['entry_point']}(") for t in p["tests"])
    humaneval = code_envs.humaneval_problems()
    assert len(humaneval) == 164
    first = humaneval[0]
    assert (
        code_tasks.grade_humaneval(
            first, f"```python\n{first['prompt']}{first['answer']}\n```", LIMITS
        ).reward
        == 1.0
    )
    assert (
        code_tasks.grade_humaneval(
            first, "```python\ndef has_close_elements(a, b):\n    return True\n```"
        ).reward
        == 0.0
    )


# A right solution of each harder task, and the default model's greedy answer where it missed (2026-12-04):
# wrong code, or right code under another name.
HARDER = {
    "last_item": ("return xs[-1]", None),
    "sum_of_squares": ("return sum(x * x for x in xs)", None),
    "cube": ("return n ** 3", "def cube(n):\n    return n * cube(n)"),
    "squares": ("return [x * x for x in xs]", "def squares_list(lst):\n    return [x ** 2 for x in lst]"),
    "count_char": (  # a right count, then a second copy of the function cut off at max_tokens
        "return s.count(c)",
        "def count_char(s, c):\n    n = 0\n    for ch in s:\n        if c in ch:\n            n += 1\n    return n\n\n"
        "def count_char(s, c):",
    ),
    "repeat": ("return s * n", "def repeat_string(s, n):\n    return s * n"),
    "positives": (
        "return [x for x in xs if x > 0]",
        "def positive_numbers(lst):\n    return [x for x in lst if x > 0]",
    ),
    "double_sum": ("return 2 * (a + b)", "def double_sum(a, b):\n    return a * 2 + b"),
    "spread": ("return max(xs) - min(xs)", "def max_min_difference(lst):\n    return max(lst) - min(lst)"),
}


def test_harder_tasks_are_solvable_and_their_tests_tell_the_base_models_mistakes():
    problems = code_envs.generated_problems(60, seed=5, harder=True)
    assert {p["entry_point"] for p in problems} == set(HARDER)
    for name, (right, wrong) in HARDER.items():
        p = next(p for p in problems if p["entry_point"] == name)
        args = p["question"].split("(", 1)[1].split(")", 1)[0]
        assert (
            code_tasks.grade(p, f"```python\ndef {name}({args}):\n    {right}\n```", LIMITS).reward == 1.0
        ), p
        if wrong is not None:
            assert code_tasks.grade(p, f"```python\n{wrong}\n```", LIMITS).reward < 1.0, p
    # Another seed, other tasks: the held-out set is not the training set.
    assert {p["question"] + p["answer"] for p in problems}.isdisjoint(
        {p["question"] + p["answer"] for p in code_envs.generated_problems(60, seed=6, harder=True)}
    )


@pytest.mark.parametrize(
    ("completion", "code"),
    [
        ("Sure:\n```python\ndef f(x):\n    return x\n```\nThis def...", "def f(x):\n    return x"),
        ("```\n```python\ndef f(x):\n    return x\n```", "def f(x):\n    return x"),  # a stray empty fence
        ("```python\ndef f(x):\n    return x", "def f(x):\n    return x"),  # cut off at max_tokens
        ("Here it is.\ndef f(x): return 1", "def f(x): return 1"),  # no fences
    ],
)
def test_code_extraction(completion: str, code: str):
    assert code_tasks.extract_code(completion, "f") == code
