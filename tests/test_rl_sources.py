"""Where code and game problems come from, checked before anything is spent (no engine needed)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from posttrain.config import TrainConfig, parse_train_args
from posttrain.errors import ConfigError, DataError
from posttrain.pipeline.data import load_data
from posttrain.pipeline.envs import games
from posttrain.pipeline.run import choose_task


def _load(path: Path):
    return load_data(str(path), max_train_rows=100, max_eval_rows=100, seed=42)


@pytest.mark.skipif(shutil.which("bwrap") is None, reason="bubblewrap is not installed")
def test_a_file_of_code_problems_is_detected_and_becomes_code_rl(tmp_path: Path):
    from posttrain.pipeline.methods.rl import RL

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
    assert choose_task(TrainConfig(dataset=str(path)), data) == "rl"
    method = RL(TrainConfig(dataset=str(path)), data)
    assert method.problems.train[0]["grader"] == "code"
    assert method.score_label.startswith("pass rate")


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

    assert games.GUESS_NUMBER_UPPER_BOUND == cookbook._UPPER_BOUND
    builder = cookbook.GuessNumberDatasetBuilder(
        batch_size=1, renderer_name="role_colon", train_group_size=2, model_name="x"
    )
    assert games._cookbook_split() == builder._get_train_and_test_numbers()
    problems = games.game_problems("guess_number", 64, 20, seed=0)
    assert {p["target"] for p in problems.eval}.isdisjoint({p["target"] for p in problems.train})
    assert problems.eval == games.game_problems("guess_number", 8, 20, seed=0).eval  # fixed by the seed


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["env=game:chess"], "env='game:chess' is not valid"),
        (["env=code:mbpp"], "env='code:mbpp' is not valid"),
        (["reward_fn=nofunction.py"], "expected path/to/file.py:function_name"),
    ],
)
def test_bad_env_settings_are_one_line(args: list[str], needle: str):
    from posttrain.pipeline.methods.rl import RL

    with pytest.raises(ConfigError) as exc:
        RL(parse_train_args(args), None)
    assert needle in str(exc.value) and "\n" not in str(exc.value)
