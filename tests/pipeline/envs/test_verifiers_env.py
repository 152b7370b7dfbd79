"""`env=verifiers:NAME` with real environment packages: built from their pyproject and installed into a folder
of their own (put on PYTHONPATH, so the venv is never touched), or loaded from a local module path. A
single-turn environment (installed) and a multi-turn one (module path) train end to end on the local engine
with the tiny model; a missing package and a load_environment that raises are one line before anything starts."""

from __future__ import annotations

import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from runs import FAST_RL, FINISHED, rl_results, train, train_here

# Single-turn: "Say WORD" rows; the rubric pays 1 for the exact word and 0.25 for replying at all.
ECHO_ENV = """
import verifiers as vf
from datasets import Dataset

WORDS = ["apple", "river", "stone", "cloud", "maple", "ember", "orbit", "delta"]


def load_environment(prefix: str = "Say", num_examples: int = 16) -> vf.Environment:
    def rows(start, n):
        return Dataset.from_list(
            [{"question": f"{prefix} {WORDS[i % 8]}.", "answer": WORDS[i % 8]} for i in range(start, start + n)]
        )

    def exact(completion, answer) -> float:
        return 1.0 if completion[-1]["content"].strip().lower() == answer else 0.0

    def replied(completion) -> float:
        return 1.0 if completion[-1]["content"].strip() else 0.0

    rubric = vf.Rubric(funcs=[exact, replied], weights=[1.0, 0.25])
    return vf.SingleTurnEnv(dataset=rows(0, num_examples), eval_dataset=rows(100, 4), rubric=rubric)
"""

# Multi-turn: the environment answers every turn, for 3 turns; the reward is the fraction of turns taken.
COUNT_ENV = """
import verifiers as vf
from datasets import Dataset


class CountEnv(vf.MultiTurnEnv):
    async def env_response(self, messages, state, **kwargs):
        return [{"role": "user", "content": f"turn {len(state['trajectory'])} done, go on"}]


def load_environment() -> vf.Environment:
    data = Dataset.from_list([{"question": f"Count from {i}.", "answer": str(i)} for i in range(12)])

    def turns(state) -> float:
        return len(state["trajectory"]) / 3

    return CountEnv(dataset=data, rubric=vf.Rubric(funcs=[turns]), max_turns=3)
"""

BROKEN_ENV = """
def load_environment():
    raise RuntimeError("no dataset configured\\n(second line)")
"""


def _package(root: Path, name: str, source: str) -> Path:
    module = name.replace("-", "_")
    folder = root / name
    folder.mkdir(parents=True)
    (folder / "pyproject.toml").write_text(
        textwrap.dedent(f"""
        [project]
        name = "{name}"
        version = "0.1.0"
        dependencies = ["verifiers"]
        [build-system]
        requires = ["setuptools"]
        build-backend = "setuptools.build_meta"
        [tool.setuptools]
        py-modules = ["{module}"]
    """)
    )
    (folder / f"{module}.py").write_text(source)
    return folder


@pytest.fixture(scope="module")
def packages(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The environment packages' folders, and `site`: where echo-env is installed (built by its own backend)."""
    root = tmp_path_factory.mktemp("vf_envs")
    found = {
        name: _package(root, name, src)
        for name, src in (("echo-env", ECHO_ENV), ("count-env", COUNT_ENV), ("broken-env", BROKEN_ENV))
    }
    uv = shutil.which("uv")
    if uv is None:
        pytest.skip("uv is not installed (it installs the environment package)")
    site = root / "site"
    subprocess.run(
        [
            uv,
            "pip",
            "install",
            "--python",
            sys.executable,
            "--target",
            str(site),
            "--no-index",
            "--no-build-isolation",
            "--no-deps",
            str(found["echo-env"]),
        ],
        check=True,
        capture_output=True,
        text=True,
    )
    assert (site / "echo_env.py").is_file()
    return {**found, "site": site}


def _run(tmp_path: Path, engine, tiny_model: str, args: list[str], name: str, site: Path | None = None):
    keys = {a.split("=")[0] for a in args}
    proc = train(
        [
            *args,
            *(f for f in FAST_RL if f.split("=")[0] not in keys),
            f"model_name={tiny_model}",
            f"base_url={engine.url}",
            f"run_name={name}",
        ],
        tmp_path,
        extra_env={"PYTHONPATH": str(site)} if site else None,
        timeout=400,
    )
    assert proc.returncode in FINISHED, proc.stdout[-3000:] + proc.stderr[-3000:]
    return rl_results(tmp_path / "results")


def test_an_installed_single_turn_environment_trains_on_its_rubric(
    tmp_path: Path, engine, tiny_model: str, packages
):
    args = ["env=verifiers:echo-env", "verifiers_args=prefix=Repeat,num_examples=8"]
    summary, base, trained = _run(tmp_path, engine, tiny_model, args, "vf_echo", packages["site"])
    assert summary["score_label"] == "mean reward (the environment's rubric)"
    assert len(base) == len(trained) == 4  # its eval dataset
    for row in base + trained:
        assert row["question"].startswith("Repeat ")  # verifiers_args reached load_environment
        assert row["reward"] in (0.0, 0.25, 1.0, 1.25)  # the rubric's weighted sum, not a grader's
        assert {"exact", "replied"} <= set(row["details"]["metrics"])  # and verifiers' own num_turns
        assert "transcript" not in row
    expected = sum(r["reward"] for r in base) / len(base)
    assert summary["baseline_score"] == pytest.approx(expected)


def test_a_multi_turn_environment_from_a_module_path_plays_every_turn(
    tmp_path: Path, engine, tiny_model: str, packages
):
    module = packages["count-env"] / "count_env.py"
    summary, base, trained = _run(tmp_path, engine, tiny_model, [f"env=verifiers:{module}"], "vf_count")
    assert len(base) == len(trained) == 4  # no eval dataset: rows held out of its dataset
    for row in base + trained:
        turns = row["transcript"]
        assert [t["turn"] for t in turns] == [1, 2, 3]
        assert turns[0]["env"] == "turn 1 done, go on" and turns[1]["env"] == "turn 2 done, go on"
        assert row["reward"] == pytest.approx(1.0)  # 3 turns of 3: the rubric saw the whole rollout


def test_a_missing_or_broken_environment_is_one_line_before_anything_starts(tmp_path: Path, packages):
    broken = packages["broken-env"] / "broken_env.py"
    cases = [
        (
            ["env=verifiers:no-such-env"],
            "env=verifiers:no-such-env: no environment module 'no_such_env' is installed",
        ),
        (
            [f"env=verifiers:{broken}"],
            "load_environment() failed: RuntimeError: no dataset configured (second line)",
        ),
        ([f"env=verifiers:{tmp_path}/nope.py"], "nope.py: no such file or folder"),
        (
            ["env=math", "verifiers_args=a=1"],
            "verifiers_args is only used by env=verifiers:NAME, not env=math",
        ),
        (["env=verifiers:no-such-env", "verifiers_args=oops"], "verifiers_args=oops: expected key=value"),
    ]
    for args, needle in cases:
        proc = train_here([*args, "backend=local"], tmp_path)
        assert proc.returncode == 2 and needle in proc.stderr, (args, proc.stderr)
        assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
        assert not (tmp_path / "results").exists()


def test_an_environment_that_is_not_installed_gets_an_install_command_that_works():
    from posttrain.errors import ConfigError
    from posttrain.pipeline.envs.verifiers_env import load

    def refusal(variant: str) -> str:
        with pytest.raises(ConfigError) as exc:
            load(variant, {})
        return str(exc.value)

    # As the Hub writes it (owner/name), the name is the command's argument as it stands: no OWNER/ added again.
    assert refusal("acme/lantern-glossary") == (
        "env=verifiers:acme/lantern-glossary: no environment module 'lantern_glossary' is installed (install it "
        "with `prime env install acme/lantern-glossary`, or pip, or give the path of its module)"
    )
    assert refusal("lantern-glossary") == (
        "env=verifiers:lantern-glossary: no environment module 'lantern_glossary' is installed (install it with "
        "`prime env install OWNER/lantern-glossary`, OWNER being its publisher on the Environments Hub, or pip, "
        "or give the path of its module)"
    )


def test_the_shipped_example_environment_loads_by_path_and_scores_reversals():
    """`env=verifiers:src/posttrain/data/reverse_word_env.py`, the README's measured example: loaded as any module
    path is, held-out words unseen in training, and its reward paying for closeness to the reversed word."""
    from posttrain.pipeline.envs.verifiers_env import load

    path = Path(__file__).resolve().parents[3] / "src" / "posttrain" / "data" / "reverse_word_env.py"
    env = load(str(path), {"num_train": 64, "num_eval": 8})
    assert (len(env.dataset), len(env.eval_dataset)) == (64, 8)
    assert not {r["answer"] for r in env.dataset} & {r["answer"] for r in env.eval_dataset}
    row = env.eval_dataset[0]
    word = row["answer"][::-1]
    assert row["prompt"][-1]["content"] == f"Word: {word}"

    module = sys.modules["reverse_word_env"]  # what load_environment came from

    def score(reply: str) -> tuple[float, float]:
        completion = [{"role": "assistant", "content": reply}]
        return module.reversed_answer(completion, row["answer"]), module.exact(completion, row["answer"])

    assert score(f"<reversed>{row['answer']}</reversed>") == (1.0, 1.0)
    assert score(f"{row['answer'].upper()}.") == (1.0, 1.0)  # letters only, any case, tags optional
    assert 0.0 < score(word)[0] < 1.0 and score(word)[1] == 0.0
    assert score("I would be glad to help with that.")[0] < 0.3
