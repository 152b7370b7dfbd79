"""task=rubric: rubric rows, their errors, and runs end to end as a user runs them (`train.py` in a subprocess)
against the session's local engine with the tiny model as policy and grader. The tiny model's judgements are
noise; what is checked is the wiring: the grader's verdicts reach the reward and the rows, the weighted mean is
the score, and every result says the scores are judged."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from runs import FINISHED, REPO, read_jsonl, rl_results, train_here

from posttrain.errors import DataError
from posttrain.pipeline.data import DataRequest, load_data

EXAMPLE = REPO / "src" / "posttrain" / "data" / "rubric_example.jsonl"
FAST = [
    "renderer_name=role_colon",
    "batch_size=2",
    "group_size=2",
    "max_steps=1",
    "max_tokens=8",
    "save_every=0",
    "eval_every=0",
    "lora_rank=4",
    "eval_concurrency=8",
]


def _write(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _rows(n: int) -> list[dict]:
    return [
        {
            "messages": [{"role": "user", "content": f"Is {i} even?"}],
            "rubric": [
                'The reply starts with "Yes" or "No".',
                {"criterion": "The reply is short.", "weight": 3},
            ],
        }
        for i in range(n)
    ]


def test_example_data_is_rubric_rows_in_both_layouts(tmp_path: Path):
    data = load_data(DataRequest(str(EXAMPLE), max_train_rows=20_000, max_eval_rows=2_000, seed=42))
    assert data.format == "rubric" and len(data.train) + len(data.eval) == 400
    weights = {i["weight"] for r in data.train for i in r["rubric"]}
    assert weights == {1.0, 2.0} and all(r["messages"][-1]["role"] == "user" for r in data.train)
    # The cookbook recipe's own layout (convo + rubric_items with rubric_str) reads the same.
    cookbook = {
        "convo": [{"role": "user", "content": "What is 4 + 5?"}],
        "rubric_items": [
            {"rubric_str": "Does the chatbot answer 9?", "extraction_regex": "<score>(.*)</score>"}
        ],
    }
    loaded = load_data(
        DataRequest(
            str(_write(tmp_path / "c.jsonl", [cookbook] * 10)), max_train_rows=100, max_eval_rows=100, seed=42
        )
    )
    assert loaded.train[0] == {
        "messages": [{"role": "user", "content": "What is 4 + 5?"}],
        "rubric": [{"criterion": "Does the chatbot answer 9?", "weight": 1.0}],
    }


@pytest.mark.parametrize(
    ("row", "needle"),
    [
        ({"rubric": ["x"]}, 'line 3: field "messages" is missing'),
        ({"prompt": "q", "rubric": []}, 'line 3: field "rubric" must be a non-empty list'),
        (
            {"prompt": "q", "rubric": [{"criterion": "x", "weight": -1}]},
            'field "rubric[0].weight" must be a number > 0',
        ),
        (
            {"prompt": "q", "rubric": [{"weight": 1}]},
            'field "rubric[0].criterion" must be a non-empty string',
        ),
        (
            {"prompt": "q", "rubric": [7]},
            'field "rubric[0]" must be a string or a {"criterion", "weight"} object',
        ),
        (
            {
                "messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}],
                "rubric": ["x"],
            },
            "must end with the user's turn (the policy writes the next reply), "
            'but the last message has role "assistant"',
        ),
    ],
)
def test_bad_rubric_rows_name_file_line_and_field(tmp_path: Path, row: dict, needle: str):
    path = _write(tmp_path / "r.jsonl", [*_rows(2), row])
    with pytest.raises(DataError) as err:
        load_data(DataRequest(str(path), max_train_rows=100, max_eval_rows=100, seed=42))
    assert f"{path} " in str(err.value) and needle in str(err.value) and "\n" not in str(err.value)


def test_data_and_setting_errors_are_one_line_before_anything_starts(tmp_path: Path):
    bad = _write(tmp_path / "bad.jsonl", [*_rows(3), {"prompt": "q", "rubric": "be nice"}])
    chat = _write(
        tmp_path / "chat.jsonl",
        [{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}] * 10,
    )
    rubric = _write(tmp_path / "ok.jsonl", _rows(10))
    cases = [
        ([f"dataset={bad}"], 'line 4: field "rubric" must be a non-empty list of criteria'),
        ([f"dataset={chat}", "task=rubric"], "task=rubric needs rows with a conversation and rubric items"),
        ([f"dataset={rubric}", "task=rubric", "grader_mode=vibes"], "grader_mode='vibes' is not valid"),
        (
            [f"dataset={rubric}", "task=sft", "grader_model=x"],
            "grader_model is not used by task=sft (only by task=rubric",
        ),
        ([f"dataset={rubric}", "grader_model=tinker://run/sampler_weights/1"], "the grader must be a model"),
    ]
    for args, needle in cases:
        proc = train_here([*args, "backend=local"], tmp_path)
        assert proc.returncode == 2 and needle in proc.stderr, (args, proc.stderr)
        assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
        assert not (tmp_path / "results").exists()


def _run(tmp_path: Path, url: str, model: str, args: list[str]) -> tuple[dict, list[dict], list[dict], Path]:
    proc = train_here([*args, *FAST, f"model_name={model}", f"base_url={url}", "run_name=rubric"], tmp_path)
    assert proc.returncode in FINISHED, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = tmp_path / "results"
    summary, base, trained = rl_results(results)
    assert "judged by" in proc.stdout
    return summary, base, trained, results


def test_rubric_run_judged_by_the_base_model(tmp_path: Path, engine, tiny_model: str):
    data = _write(tmp_path / "rubric.jsonl", _rows(30))  # 30 rows: a held-out set of 3 is within 10%
    held_out = _write(tmp_path / "rubric_eval.jsonl", _rows(3))
    summary, base, trained, results = _run(
        tmp_path, engine.url, tiny_model, [f"dataset={data}", f"eval_dataset={held_out}"]
    )
    assert summary["task_type"] == "rl" and summary["method"] == "rubric"  # task=auto, from the rows
    assert summary["score_kind"] == "judged" and summary["grader_model"] == tiny_model
    assert summary["grader_mode"] == "probability"
    assert summary["headline"].startswith(f"Base rubric score (judged by {tiny_model}): ")
    assert "not verified" in summary["score_note"]
    report = (results / "report.md").read_text()
    assert f"judged by {tiny_model}" in report and "not verified" in report
    for row in base + trained:
        assert "error" not in row, row
        items = row["details"]["items"]
        assert row["details"]["score_kind"] == "judged" and row["details"]["grader"] == tiny_model
        assert [(i["criterion"], i["weight"]) for i in items] == [
            ('The reply starts with "Yes" or "No".', 1.0),
            ("The reply is short.", 3.0),
        ]
        for item in items:  # the raw verdict is the grader's P(Yes), P(No); the score their ratio
            p_yes, p_no = map(float, re.fullmatch(r"P\(Yes\)=(\S+) P\(No\)=(\S+)", item["verdict"]).groups())
            assert item["score"] == pytest.approx(p_yes / (p_yes + p_no), rel=1e-3)
        weighted = (items[0]["score"] + 3 * items[1]["score"]) / 4
        assert row["reward"] == pytest.approx(weighted)
        assert row["correct"] == all(i["score"] >= 0.5 for i in items)
    assert summary["baseline_score"] == pytest.approx(sum(r["reward"] for r in base) / 3)
    assert summary["trained_score"] == pytest.approx(sum(r["reward"] for r in trained) / 3)
    per_example = summary["judged_per_example"]
    assert per_example["improved"] + per_example["regressed"] + per_example["unchanged"] == 3
    metrics = read_jsonl(tmp_path / summary["log_path"] / "metrics.jsonl")
    assert any(0 <= m.get("env/all/rubric_score", -1) <= 1 for m in metrics)
    assert all(m.get("env/all/grader_error", 0) == 0 for m in metrics)


def test_rubric_run_with_another_grader_model_and_sampled_verdicts(
    tmp_path: Path, keyed_engine, tiny_model: str, tiny_model_b: str
):
    data = _write(tmp_path / "rubric.jsonl", _rows(30))
    held_out = _write(tmp_path / "rubric_eval.jsonl", _rows(2))
    summary, base, trained, _ = _run(
        tmp_path,
        keyed_engine.url,
        tiny_model,
        [
            f"dataset={data}",
            f"eval_dataset={held_out}",
            f"grader_model={tiny_model_b}",
            "grader_mode=sampled",
        ],
    )
    assert summary["grader_model"] == tiny_model_b and summary["grader_mode"] == "sampled"
    assert f"(judged by {tiny_model_b})" in summary["headline"]
    for row in base + trained:
        for item in row["details"]["items"]:
            # The tiny grader's sampled text is noise: without <score>...</score> the item scores 0.
            assert isinstance(item["verdict"], str) and 0 <= item["score"] <= 1
            if "<score>" not in item["verdict"]:
                assert item["score"] == 0


def test_grader_choice_before_anything_is_served(tmp_path: Path):
    from types import SimpleNamespace

    from posttrain.pipeline.methods.rubric import RubricConfig, rubric

    data = load_data(DataRequest(str(EXAMPLE), max_train_rows=20_000, max_eval_rows=2_000, seed=42))
    said: list[str] = []

    def judged(**settings):
        method = rubric(RubricConfig(batch_size=4, **settings), data)
        ctx = SimpleNamespace(cfg=RubricConfig(), renderer_name="qwen3_instruct", say=said.append)
        return method, method.judging.settings(ctx)

    default, chosen = judged()
    assert default.extra_models == () and chosen["grader_model"] == RubricConfig().model_name
    assert said[-1].startswith(f"grader: {RubricConfig().model_name} (the base model")
    assert len(default.problems.eval) == 40 and len(default.problems.train) == 360
    # Another model is served beside the policy; P(Yes) needs its reply to start with the answer, so Qwen3's
    # thinking renderer is switched off for it.
    qwen, chosen = judged(grader_model="Qwen/Qwen3-8B")
    assert (
        qwen.extra_models == ("Qwen/Qwen3-8B",) and chosen["grader_renderer_name"] == "qwen3_disable_thinking"
    )
    assert judged(grader_model="Qwen/Qwen3-8B", grader_mode="sampled")[1]["grader_renderer_name"] == "qwen3"
    assert qwen.score_label == "rubric score (judged by Qwen/Qwen3-8B)"
