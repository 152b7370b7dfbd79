"""RL beyond math, end to end as a user runs it (`train.py` in a subprocess) against the session's local engine
over loopback, with the tiny model: user verifiers (good and crashing), code RL in the sandbox, and the
multi-turn guess-the-number game. The tiny model's answers are noise; what is checked is the wiring: rewards
come from the right place, errors are counted and never crash the run, and the rows carry what they should."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from runs import FAST_RL, FINISHED, read_jsonl, rl_results, train_here


def _run(
    tmp_path: Path, engine, tiny_model: str, args: list[str], name: str
) -> tuple[dict, list[dict], list[dict]]:
    proc = train_here(
        [
            *args,
            *(f for f in FAST_RL if f.split("=")[0] not in {a.split("=")[0] for a in args}),
            f"model_name={tiny_model}",
            f"base_url={engine.url}",
            f"run_name={name}",
        ],
        tmp_path,
    )
    assert proc.returncode in FINISHED, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary, base, trained = rl_results(tmp_path / "results")
    return summary, base, trained


def test_user_verifier_sets_rewards_and_a_crash_scores_zero_with_its_line(
    tmp_path: Path, engine, tiny_model: str
):
    # 40 training rows: the 4 held-out ones are within the 10% an evaluation may take.
    rows = [{"question": f"{'Crash' if i % 2 else 'Say'} {i}.", "answer": str(i)} for i in range(40)]
    data, held_out = tmp_path / "qa.jsonl", tmp_path / "qa_eval.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    held_out.write_text("".join(json.dumps(r) + "\n" for r in rows[:4]))
    verifier = tmp_path / "my_verifier.py"
    verifier.write_text(
        "def score(row, completion):\n"
        "    # any non-empty answer earns reward (the tiny model's noise scores ~0 with the math grader)\n"
        "    if row['question'].startswith('Crash'):\n"
        "        return 1 / 0\n"
        "    return 1.0 if completion.strip() else 0.5\n"
    )
    args = [f"dataset={data}", f"eval_dataset={held_out}", f"reward_fn={verifier}:score", "group_size=4"]
    summary, base, trained = _run(tmp_path, engine, tiny_model, args, "verifier")
    assert summary["reward_fn"].endswith("my_verifier.py:score")
    assert summary["score_label"] == "mean reward (user verifier)"
    for row in base + trained:
        if row["question"].startswith("Say"):  # the verifier's own value, not the math grader's 0
            assert row["reward"] in (0.5, 1.0) and "verifier_error" not in row
        else:  # crashed: 0 for this sample, with the verifier's file and line; the run went on
            assert row["reward"] == 0.0 and row["correct"] is False
            assert "my_verifier.py:4: ZeroDivisionError" in row["verifier_error"]
    assert summary["baseline_score"] >= 0.25  # 2 of 4 held-out rows earn 0.5 or 1
    errors = summary["verifier_errors"]
    assert errors["by_phase"]["base model"] == 2 and errors["by_phase"]["trained model"] == 2
    assert errors["by_phase"].get("train", 0) in (0, 4, 8)  # 2 problems x 4 rollouts, each one may crash
    assert errors["count"] == sum(errors["by_phase"].values())
    assert "my_verifier.py:4: ZeroDivisionError: division by zero" in errors["first"]
    log = (tmp_path / summary["log_path"] / "verifier_errors.jsonl").read_text()
    assert log.count("my_verifier.py:4: ZeroDivisionError") == errors["count"]


def test_a_missing_verifier_file_or_function_is_one_line_before_anything_starts(tmp_path: Path):
    (tmp_path / "v.py").write_text("def other(row, completion):\n    return 1.0\n")
    for spec, reason in (
        (f"{tmp_path}/v.py:nope", f"{tmp_path}/v.py has no function 'nope' (functions there: other)"),
        (f"{tmp_path}/missing.py:f", f"file {tmp_path}/missing.py not found"),
    ):
        proc = train_here(["env=arithmetic", f"reward_fn={spec}", "backend=local"], tmp_path)
        assert proc.returncode == 2 and proc.stderr == f"error: reward_fn={spec}: {reason}\n", proc.stderr
        assert not (tmp_path / "results").exists()


@pytest.mark.skipif(shutil.which("bwrap") is None, reason="bubblewrap is not installed")
def test_code_rl_on_generated_tasks_runs_tests_in_the_sandbox(tmp_path: Path, engine, tiny_model: str):
    summary, base, trained = _run(tmp_path, engine, tiny_model, ["env=code", "max_tokens=16"], "code_rl")
    assert summary["score_label"].startswith("pass rate")
    for row in base + trained:
        assert row["question"].startswith("Write a Python function `")
        assert row["ground_truth"].startswith("assert ")
        assert row["details"]["tests_total"] == 4 and 0 <= row["reward"] <= 1
    problems = read_jsonl(tmp_path / summary["log_path"] / "data" / "train_problems.jsonl")
    assert problems[0]["grader"] == "code" and problems[0]["tests"]
    metrics = read_jsonl(tmp_path / summary["log_path"] / "metrics.jsonl")
    assert any("env/all/score" in m for m in metrics)


def test_guess_number_game_reports_win_rate_and_transcripts(tmp_path: Path, engine, tiny_model: str):
    summary, base, trained = _run(
        tmp_path,
        engine,
        tiny_model,
        ["env=game:guess_number", "max_tokens=5", "max_eval_rows=2", "batch_size=1"],
        "game",
    )
    assert summary["score_label"] == "win rate" and 0 <= summary["trained_score"] <= 1
    assert "answer_instruction" not in summary  # the game's own prompt; no '####' is asked for
    # the same held-out games
    assert [r["ground_truth"] for r in base] == [r["ground_truth"] for r in trained]
    for row in base + trained:
        turns = row["transcript"]
        assert 1 <= len(turns) <= 10 and turns[0]["turn"] == 1
        assert set(turns[0]) == {"turn", "player", "env", "reward"}
        assert row["correct"] == any(t["reward"] == 1.0 for t in turns)
    metrics = read_jsonl(tmp_path / summary["log_path"] / "metrics.jsonl")
    assert any("env/all/reward/total" in m for m in metrics)


def test_tic_tac_toe_reports_win_draw_loss_rates_and_board_transcripts(
    tmp_path: Path, engine, tiny_model: str
):
    args = ["env=game:tic_tac_toe", "game_opponent=blocker", "max_tokens=4", "max_eval_rows=4"]
    summary, base, trained = _run(tmp_path, engine, tiny_model, args, "ttt")
    assert summary["score_label"] == "win rate" and summary["dataset"]["env"] == "game:tic_tac_toe"
    for side, rows in (("baseline", base), ("trained", trained)):
        rates = [summary[f"{side}_{k}_rate"] for k in ("win", "draw", "loss")]
        assert abs(sum(rates) - 1) < 1e-9 and summary[f"{side}_win_rate"] == summary[f"{side}_score"]
        assert 0 <= summary[f"{side}_illegal_move_rate"] <= summary[f"{side}_loss_rate"]
        assert [r["details"]["player"] for r in rows] == ["O", "X", "O", "X"]  # seats alternate
        for row in rows:
            assert row["details"]["opponent"] == "blocker" and row["correct"] == (
                row["details"]["outcome"] == "win"
            )
            assert row["reward"] == {"win": 1.0, "draw": 0.5, "loss": 0.0}[row["details"]["outcome"]]
            turns = row["transcript"]
            assert 1 <= len(turns) <= 5 and " | " in turns[0]["board"] and " | " in turns[-1]["board_after"]
            assert turns[-1]["env"].endswith(("win", "draw", "loss"))
    assert [r["question"] for r in base] == [r["question"] for r in trained]  # the same held-out games
    games = read_jsonl(tmp_path / summary["log_path"] / "data" / "train_problems.jsonl")
    assert games[0]["opponent"] == "blocker" and [g["player_id"] for g in games[:2]] == [0, 1]
    metrics = read_jsonl(tmp_path / summary["log_path"] / "metrics.jsonl")
    assert any("env/all/win" in m and "env/all/illegal_move" in m for m in metrics), metrics[-1].keys()


def test_tic_tac_toe_self_play_trains_both_seats_and_is_measured_against_a_fixed_opponent(
    tmp_path: Path, engine, tiny_model: str
):
    args = ["env=game:tic_tac_toe", "game_opponent=self", "max_tokens=4", "max_eval_rows=2", "batch_size=2"]
    summary, base, trained = _run(tmp_path, engine, tiny_model, args, "selfplay")
    assert "self-play" in summary["dataset"]["source"]
    assert summary["dataset"]["eval_source"].endswith(
        "against the random opponent (self-play trains; a fixed opponent measures)"
    )
    assert {r["details"]["opponent"] for r in base + trained} == {"random"}
    games = read_jsonl(tmp_path / summary["log_path"] / "data" / "train_problems.jsonl")
    assert {g["opponent"] for g in games} == {"self"}
    # Both seats of each game are trajectories of the training batch: the loop's rollout log shows both.
    rollouts = (tmp_path / summary["log_path"] / "iteration_000000" / "train.html").read_text()
    assert rollouts.count("seat: O") >= 1 and rollouts.count("seat: X") >= 1
    metrics = read_jsonl(tmp_path / summary["log_path"] / "metrics.jsonl")
    assert any("env/all/opponent_illegal_move" in m for m in metrics), metrics[-1].keys()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["group_size=3"], "game_opponent=self needs an even group_size (each game fills two seats), got 3"),
        (
            ["teacher_model=x", "distillation_mode=on_policy"],
            "game_opponent=self is only used by task=rl (self-play trains both seats)",
        ),
    ],
)
def test_self_play_settings_are_checked_before_anything_starts(tmp_path: Path, args: list[str], message: str):
    proc = train_here(["env=game:tic_tac_toe", "game_opponent=self", *args, "backend=local"], tmp_path)
    assert proc.returncode == 2 and proc.stderr.strip() == f"error: {message}", proc.stderr


def test_a_hanging_verifier_times_out_and_the_run_goes_on(tmp_path: Path, engine, tiny_model: str):
    rows = [{"question": f"{('Sleep', 'Spin', 'Say')[i % 3]} {i}.", "answer": str(i)} for i in range(60)]
    data = tmp_path / "qa.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    verifier = tmp_path / "stuck.py"
    verifier.write_text(
        "import time\n\n"
        "def score(row, completion):\n"
        "    if row['question'].startswith('Sleep'):\n"
        "        time.sleep(10**6)\n"
        "    while row['question'].startswith('Spin'):\n"
        "        pass\n"
        "    return 1.0\n"
    )
    args = [
        f"dataset={data}",
        f"eval_dataset={data}",
        f"reward_fn={verifier}:score",
        "verifier_timeout=1",
        "max_eval_rows=6",
        "max_steps=1",
        "batch_size=1",
    ]
    summary, base, trained = _run(tmp_path, engine, tiny_model, args, "stuck_verifier")
    assert summary["hyperparameters"]["verifier_timeout"] == 1
    for row in base + trained:
        if row["question"].startswith("Say"):
            assert row["reward"] == 1.0 and "verifier_error" not in row
        else:
            assert row["reward"] == 0.0 and row["verifier_error"].endswith(
                "timed out after 1 s (the call was stopped)"
            )
    assert summary["verifier_errors"]["by_phase"]["base model"] == 4
    assert summary["durations_seconds"]["base_eval"] < 30  # 4 timed-out calls of 1 s, 2+ at a time


def test_factual_qa_is_graded_by_token_f1_and_the_rows_say_so(tmp_path: Path, engine, tiny_model: str):
    names = ["Ada Lovelace", "Teodor Vlask", "Marie Curie", "Alan Turing"]
    rows = [{"question": f"Who is person {i}?", "answer": names[i % 4]} for i in range(40)]
    data = tmp_path / "people.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    summary, base, trained = _run(tmp_path, engine, tiny_model, [f"dataset={data}"], "factual")
    assert (
        summary["dataset"]["grader"] == "f1"
        and "100% of the answers are text" in summary["dataset"]["grader_reason"]
    )
    assert summary["score_label"] == "token F1 (correct = exact match)"
    assert summary["answer_instruction"] == "Give only the final answer after ####."
    for row in base + trained:
        assert row["details"]["grader"] == "f1" and 0.0 <= row["reward"] == row["details"]["f1"] <= 1.0
        assert row["correct"] == (row["reward"] == 1.0)
    problems = read_jsonl(tmp_path / summary["log_path"] / "data" / "train_problems.jsonl")
    assert {p["grader"] for p in problems} == {"f1"}


def test_the_grader_setting_belongs_to_question_answer_data(tmp_path: Path):
    proc = train_here(["env=arithmetic", "grader=f1", "backend=local"], tmp_path)
    assert proc.returncode == 2 and proc.stderr.strip() == (
        "error: grader is only used by env=math, not env=arithmetic; leave it out"
    ), proc.stderr
    proc = train_here(["task=sft", "grader=f1", "backend=local"], tmp_path)
    assert (
        proc.stderr.strip()
        == "error: grader is not used by task=sft (only by task=distillation, rl); leave it out"
    )


def test_eval_every_plays_the_held_out_problems_during_rl_training(tmp_path: Path, engine, tiny_model: str):
    args = ["env=arithmetic", "eval_every=1", "max_steps=2", "max_eval_rows=4", "max_tokens=6"]
    summary, base, trained = _run(tmp_path, engine, tiny_model, args, "rl_curve")
    metrics = read_jsonl(tmp_path / summary["log_path"] / "metrics.jsonl")
    curve = [(m["step"], m["test/env/all/reward/total"]) for m in metrics if "test/env/all/reward/total" in m]
    # Before step 0, after step 1 and at the end; a reward is the score minus the format penalty (-0.1 to 1).
    assert [step for step, _ in curve] == [0, 1, 2] and all(-0.1 <= v <= 1 for _, v in curve), curve
    counted = [m["test/env/all/total_episodes"] for m in metrics if "test/env/all/total_episodes" in m]
    assert counted and all(n == len(base) == 4 for n in counted)  # every held-out problem, once
    report = (tmp_path / "results" / "report.md").read_text()
    assert (
        "![training curves]" in report and (tmp_path / "results" / "training_curves.png").stat().st_size > 0
    )
