"""task=rlhf end to end (policy SFT -> reward model -> RL against it, through the real SDK and the cookbook's
loops on the local engine with the tiny model), its data errors, and the task accuracy that verifiable
preference pairs (rows with an answer) add to DPO and RLHF evaluations."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
from runs import FINISHED, read_jsonl, train_here

from posttrain.errors import ConfigError, DataError
from posttrain.pipeline.data import LoadedData
from posttrain.pipeline.data.formats import normalize_row
from posttrain.pipeline.results import (
    PREFERENCE_KEYS,
    PREFERENCE_OPTIONAL_KEYS,
    PreferenceExample,
    validate_rows,
    validate_summary,
)
from posttrain.pipeline.settings import parse_train_args

TINY = ["renderer_name=role_colon", "backend=local", "lora_rank=4", "save_every=0", "eval_every=0"]
STAGES = ("sft", "reward_model", "rl")


def _write_pairs(path: Path, n: int = 30) -> Path:
    rows = [
        {
            "prompt": f"What is {i} + 1?",
            "chosen": f"#### {i + 1}",
            "rejected": f"#### {i + 3}",
            "answer": i + 1,
        }
        for i in range(n)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def rlhf_run(tmp_path_factory: pytest.TempPathFactory, tiny_model: str, engine):
    cwd = tmp_path_factory.mktemp("rlhf")
    data = _write_pairs(cwd / "pairs.jsonl")
    proc = train_here(
        [
            f"dataset={data}",
            f"model_name={tiny_model}",
            "task=rlhf",
            *TINY,
            "learning_rate=0.01",
            "batch_size=4",
            "group_size=2",
            "max_steps=2",
            "max_tokens=6",
            "run_name=rlhf_e2e",
            f"base_url={engine.url}",
        ],
        cwd,
    )
    return cwd, proc


def test_rlhf_run_has_three_stages_one_results_folder(rlhf_run) -> None:
    cwd, proc = rlhf_run
    # 1 = trained but not better: allowed for two steps per stage of a random tiny model.
    assert proc.returncode in FINISHED, proc.stdout[-3000:] + proc.stderr[-3000:]
    for n, stage in enumerate(STAGES, 1):
        assert f"training stage {n}/3: {stage}: 2 steps" in proc.stdout
    assert "reward model: accuracy " in proc.stdout and "task accuracy" in proc.stdout

    results = cwd / "results"
    summary = json.loads((results / "summary.json").read_text())
    validate_summary(summary)
    assert (
        summary["task_type"] == "rl"
        and summary["method"] == "rlhf"
        and summary["score_label"] == "preference accuracy"
    )
    logs = results / "logs" / "rlhf_e2e"
    for stage in STAGES:  # each stage's cookbook logs in its own folder, ending in a final checkpoint
        assert read_jsonl(logs / stage / "metrics.jsonl")
        final = read_jsonl(logs / stage / "checkpoints.jsonl")[-1]
        assert final["name"] == "final" and final["sampler_path"].startswith("tinker://")
        assert (
            summary["stages"][stage]["steps"] == 2 and summary["durations_seconds"][f"training_{stage}"] > 0
        )
    assert any("win_minus_loss" in k for k in read_jsonl(logs / "rl" / "metrics.jsonl")[0])
    # The trained model is the RL stage's; the RL stage started from the SFT stage's weights.
    assert summary["checkpoint_path"] == read_jsonl(logs / "rl" / "checkpoints.jsonl")[-1]["sampler_path"]
    assert (
        summary["reward_model_checkpoint"]
        == read_jsonl(logs / "reward_model" / "checkpoints.jsonl")[-1]["sampler_path"]
    )
    sft_state = read_jsonl(logs / "sft" / "checkpoints.jsonl")[-1]["state_path"]
    assert f"Loaded weights from {sft_state}" in (logs / "rl" / "logs.log").read_text()
    assert summary["stages"]["sft"]["train_on_what"] == "last_assistant_message"
    lrs = {s: summary["stages"][s]["learning_rate"] for s in STAGES}
    assert lrs == {"sft": 0.01, "reward_model": 0.01, "rl": 0.005}
    assert "/rl/" in summary["wandb_url"] and summary["wandb_verification"]["verified"]

    assert 0 <= summary["reward_model_accuracy"] <= 1 and 0 <= summary["reward_model_no_verdict"] <= 1
    for key in (
        "baseline_mean_margin",
        "trained_mean_margin",
        "baseline_task_accuracy",
        "trained_task_accuracy",
    ):
        assert isinstance(summary[key], float), key
    rows = read_jsonl(results / "trained_model.jsonl")
    validate_rows(rows, "score", "preference")
    assert tuple(rows[0]) == (*PREFERENCE_KEYS, *PREFERENCE_OPTIONAL_KEYS)
    assert len(rows) == summary["sizes"]["eval_pairs"] == 3
    assert rows[0]["ground_truth"] == str(int(rows[0]["chosen"].removeprefix("#### ")))
    assert summary["trained_task_accuracy"] == sum(r["task_correct"] for r in rows) / len(rows)


def test_rlhf_data_and_settings_errors(tmp_path: Path, tiny_model: str) -> None:
    from posttrain.pipeline.methods.rlhf import RLHF, RLHFConfig

    chat_rows = [{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}]
    chat = LoadedData(
        "messages", chat_rows * 3, chat_rows, "chat.jsonl (local file)", "10% of training rows", []
    )
    with pytest.raises(ConfigError, match="task=rlhf needs preference pairs.*messages format"):
        RLHF(RLHFConfig(), chat)
    pair = normalize_row({"prompt": "p", "chosen": "a", "rejected": "b"}, "preference", "x")
    few = LoadedData("preference", [pair], [pair], "pairs.jsonl (local file)", "10% of training rows", [])
    with pytest.raises(ConfigError, match="task=rlhf needs at least 2 training pairs and 1 held-out pair"):
        RLHF(RLHFConfig(), few)
    with pytest.raises(ConfigError, match="dpo_beta is only used by task=dpo, not task=rlhf"):
        parse_train_args(["task=rlhf", "dpo_beta=0.2"])

    # A bad ground truth is named by file and line, before anything starts.
    data = tmp_path / "pairs.jsonl"
    _write_pairs(data, 6)
    lines = data.read_text().splitlines()
    lines[3] = json.dumps({"prompt": "p", "chosen": "a", "rejected": "b", "answer": [4]})
    data.write_text("\n".join(lines) + "\n")
    proc = train_here([f"dataset={data}", f"model_name={tiny_model}", "task=rlhf", *TINY], tmp_path)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert 'line 4: field "answer" must be a string or a number, got list' in proc.stderr
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "results").exists()


def test_verifiable_pairs_keep_their_answer() -> None:
    from posttrain.pipeline.evaluation.preference import PreferenceEvaluation

    row = normalize_row({"prompt": "2+5?", "chosen": "7", "rejected": "8", "answer": 7}, "preference", "x")
    assert row["answer"] == "7"
    gsm = normalize_row(
        {"prompt": "q", "chosen": "a", "rejected": "b", "ground_truth": "so #### 12"}, "preference", "x"
    )
    assert gsm["answer"] == "12"
    plain = normalize_row({"prompt": "q", "chosen": "a", "rejected": "b"}, "preference", "x")
    assert "answer" not in plain
    assert PreferenceEvaluation([row, gsm]).verifiable and not PreferenceEvaluation([row, plain]).verifiable
    with pytest.raises(DataError, match='d line 2: field "ground_truth" is empty'):
        normalize_row(
            {"prompt": "q", "chosen": "a", "rejected": "b", "ground_truth": " "}, "preference", "d line 2"
        )


def test_task_accuracy_samples_and_grades_each_held_out_prompt(service, tiny_model: str) -> None:
    import tinker_cookbook.renderers as renderers
    from tinker_cookbook.tokenizer_utils import get_tokenizer

    from posttrain.pipeline.evaluation.common import SamplingSettings
    from posttrain.pipeline.evaluation.preference import evaluate_pair_answers
    from posttrain.pipeline.scoring.grading import extract_answer, grade_math

    renderer = renderers.get_renderer("role_colon", get_tokenizer(tiny_model))
    rows = [
        normalize_row(
            {"prompt": f"What is {i} + 1?", "chosen": f"{i + 1}", "rejected": "x", "answer": i + 1},
            "preference",
            f"line {i}",
        )
        for i in range(3)
    ]
    records = [
        PreferenceExample(i, r["prompt"][0]["content"], r["chosen"], r["rejected"], -1.0, -2.0, 1.0, True)
        for i, r in enumerate(rows)
    ]

    async def go() -> float:
        client = await service.create_sampling_client(base_model=tiny_model)
        return await evaluate_pair_answers(
            client,
            records,
            rows,
            renderer,
            SamplingSettings(max_tokens=4, temperature=0.0, seed=0, concurrency=3),
            "test",
        )

    accuracy = asyncio.run(go())
    dicts = [r.to_dict() for r in records]
    validate_rows(dicts, "score", "preference")
    for row, d in zip(rows, dicts, strict=True):
        assert d["ground_truth"] == row["answer"] and d["completion"]  # greedy, 4 tokens: never empty
        assert d["extracted_answer"] == extract_answer(d["completion"])
        assert d["task_correct"] == grade_math({"answer": row["answer"]}, d["extracted_answer"])
        assert d["correct"] is True  # the preference verdict is left as it was
    assert accuracy == sum(d["task_correct"] for d in dicts) / 3
