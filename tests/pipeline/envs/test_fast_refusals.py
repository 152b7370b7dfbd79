"""Bad environment input is refused in one line and fast (the README: "well under 3 s"): a verifiers environment
that is missing, raises on import or from its load_environment, and a search corpus row without text are all
refused before the heavy imports (torch with the Tinker SDK, verifiers, datasets, chromadb, the embedding model).

Each case runs `posttrain train ARGS` in a fresh interpreter, so what the refusal imported is its own: an
in-process run would find torch already imported by other tests and prove nothing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from runs import write_jsonl

# What a refusal must not import: each costs a second or more on a busy 2-core machine.
HEAVY = ("torch", "tinker", "verifiers", "datasets", "chromadb", "sentence_transformers", "transformers")
# The in-process duration of the refusal (the CLI's code, not the interpreter start); generous for a busy machine.
BUDGET_S = 3.0

REFUSE = """
import json, sys, time
from posttrain.cli.main import main

started = time.monotonic()
code = main(["train", *sys.argv[2:]])
seconds = time.monotonic() - started
heavy = [m for m in json.loads(sys.argv[1]) if m in sys.modules]
print("REFUSAL " + json.dumps({"code": code, "seconds": seconds, "heavy": heavy}))
"""


def _refuse(args: list[str], cwd: Path) -> tuple[str, dict]:
    """`posttrain train ARGS` in a new interpreter: its stderr, and its exit code, duration and heavy imports."""
    env = {**os.environ, "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, "-c", REFUSE, json.dumps(HEAVY), *args, "backend=local"],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    line = next((x for x in proc.stdout.splitlines() if x.startswith("REFUSAL ")), None)
    assert line is not None, proc.stdout[-2000:] + proc.stderr[-2000:]
    return proc.stderr, json.loads(line.removeprefix("REFUSAL "))


def _module(tmp_path: Path, name: str, source: str) -> Path:
    path = tmp_path / f"{name}.py"
    path.write_text(source)
    return path


def _cases(tmp_path: Path) -> dict[str, tuple[list[str], str]]:
    raises = _module(tmp_path, "raises_on_import", 'raise RuntimeError("cannot start\\n(second line)")\n')
    broken = _module(
        tmp_path, "broken_load", 'def load_environment():\n    raise RuntimeError("no dataset configured")\n'
    )
    no_loader = _module(tmp_path, "no_loader", "VALUE = 1\n")
    textless = write_jsonl(tmp_path / "textless.jsonl", [{"text": "x"}, {"id": "b", "title": "no text"}])
    qa = write_jsonl(tmp_path / "qa.jsonl", [{"question": f"q{i}?", "answer": "a"} for i in range(40)])
    return {
        "verifiers: not installed": (
            ["env=verifiers:no-such-env"],
            "error: env=verifiers:no-such-env: no environment module 'no_such_env' is installed (install it with "
            "`prime env install OWNER/no-such-env`, OWNER being its publisher on the Environments Hub, or pip, "
            "or give the path of its module)",
        ),
        "verifiers: raises on import": (
            [f"env=verifiers:{raises}"],
            f"error: env=verifiers:{raises}: importing module 'raises_on_import' failed: RuntimeError: cannot "
            "start (second line)",
        ),
        "verifiers: load_environment raises": (
            [f"env=verifiers:{broken}"],
            f"error: env=verifiers:{broken}: load_environment() failed: RuntimeError: no dataset configured",
        ),
        "verifiers: no load_environment": (
            [f"env=verifiers:{no_loader}"],
            f"error: env=verifiers:{no_loader}: module 'no_loader' ({no_loader}) has no load_environment "
            "function: another module of that name comes first, or it is not an environment",
        ),
        "search: a corpus row without text": (
            ["env=tools:search", f"corpus={textless}", f"dataset={qa}"],
            f'error: corpus={textless.resolve()} line 2: no "text" (every passage needs a non-empty text)',
        ),
    }


@pytest.mark.parametrize(
    "case",
    [
        "verifiers: not installed",
        "verifiers: raises on import",
        "verifiers: load_environment raises",
        "verifiers: no load_environment",
        "search: a corpus row without text",
    ],
)
def test_a_bad_environment_is_refused_in_one_line_before_the_heavy_imports(case: str, tmp_path: Path):
    args, message = _cases(tmp_path)[case]
    stderr, refusal = _refuse(args, tmp_path)
    assert refusal["code"] == 2 and stderr.strip() == message, stderr
    assert refusal["heavy"] == [], refusal  # checked before torch, verifiers, chromadb... were needed
    assert refusal["seconds"] < BUDGET_S, refusal
    assert not (tmp_path / "results").exists()
