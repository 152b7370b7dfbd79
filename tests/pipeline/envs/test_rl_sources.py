"""Where code and game problems come from, checked before anything is spent (no engine needed)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from posttrain.errors import ConfigError, DataError
from posttrain.pipeline.data import DataRequest, load_data
from posttrain.pipeline.envs.games import guess_number
from posttrain.pipeline.methods.choice import choose_task
from posttrain.pipeline.settings import TrainConfig, method_config, parse_train_args


def _load(path: Path):
    return load_data(DataRequest(str(path), max_train_rows=100, max_eval_rows=100, seed=42))


@pytest.mark.skipif(shutil.which("bwrap") is None, reason="bubblewrap is not installed")
def test_a_file_of_code_problems_is_detected_and_becomes_code_rl(tmp_path: Path):
    from posttrain.pipeline.methods.rl import RL, RLConfig

    rows = [
        {
            "question": f"Write inc(n) returning n + {i}.",
            "entry_point": "inc",
            "tests": [f"assert inc(1) == {1 + i}"],
        }
        for i in range(10)
    ]
    path = tmp_path / "code.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    data = _load(path)
    assert data.format == "code"
    assert choose_task(TrainConfig(dataset=str(path)), data)[0] == "rl"
    method = RL(RLConfig(dataset=str(path)), data)
    assert method.problems.train[0]["grader"] == "code"
    assert method.score_label.startswith("pass rate")
    with pytest.raises(ConfigError, match="env=code:harder generates its own tasks") as exc:
        RL(RLConfig(dataset=str(path), env="code:harder"), data)
    assert "\n" not in str(exc.value)


def test_a_malformed_code_test_names_the_file_and_line(tmp_path: Path):
    path = tmp_path / "code.jsonl"
    path.write_text(
        json.dumps({"question": "q", "tests": ["assert f(1) == 1"]})
        + "\n"
        + json.dumps({"question": "q", "tests": ["print(f(1))"]})
        + "\n"
    )
    with pytest.raises(
        DataError, match=r"code.jsonl line 2: test 'print\(f\(1\)\)' is not of the form"
    ) as exc:
        _load(path)
    assert "\n" not in str(exc.value)


def test_guess_number_games_are_held_out_and_match_the_cookbook():
    from tinker_cookbook.recipes.multiplayer_rl.guess_number import env as cookbook

    from posttrain.pipeline.envs.spec import EnvSpec
    from posttrain.pipeline.methods.rl import RLConfig

    assert guess_number.GUESS_NUMBER_UPPER_BOUND == cookbook._UPPER_BOUND
    assert guess_number.MAX_TURNS == cookbook.MAX_TURNS
    builder = cookbook.GuessNumberDatasetBuilder(
        batch_size=1, renderer_name="role_colon", train_group_size=2, model_name="x"
    )
    assert guess_number.cookbook_split() == builder._get_train_and_test_numbers()
    game = guess_number.GuessNumber()

    def problems(batch_size: int):
        return game.problems(
            EnvSpec("game", "guess_number"), RLConfig(batch_size=batch_size, max_eval_rows=20), None
        )

    held_out = problems(64).eval
    assert {p["target"] for p in held_out}.isdisjoint({p["target"] for p in problems(64).train})
    assert held_out == problems(8).eval  # fixed by the seed


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["env=game:chess"], "env=game:chess: no such environment"),
        (
            ["env=code:mbpp"],
            "env=code:mbpp: expected env=code, env=code:harder (env=code:harder:humaneval=true",
        ),
        (["env=code:harder:humaneval=3"], "env=code:harder:humaneval=3: expected env=code, env=code:harder"),
        (["env=code:humaneval:humaneval=true"], "expected env=code, env=code:harder"),
        (["reward_fn=nofunction.py"], "expected path/to/file.py:function_name"),
    ],
)
def test_bad_env_settings_are_one_line(args: list[str], needle: str):
    from posttrain.pipeline.methods.rl import RL

    with pytest.raises(ConfigError) as exc:
        RL(method_config(parse_train_args(args), "rl"), None)
    assert needle in str(exc.value) and "\n" not in str(exc.value)
