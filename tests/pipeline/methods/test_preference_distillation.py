"""DPO, distillation (off- and on-policy) and prompt distillation: end to end through `train.py` on the local
engine with the tiny model, their settings and data errors, the teacher/student mismatch refusal, and the
preference row schema."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from runs import FINISHED, read_jsonl, train_here

from posttrain.errors import ConfigError, DataError
from posttrain.pipeline.data import LoadedData
from posttrain.pipeline.data.formats import normalize_row
from posttrain.pipeline.methods.choice import choose_task
from posttrain.pipeline.methods.distillation.prompts import gradable
from posttrain.pipeline.methods.distillation.teachers import check_same_tokenizer
from posttrain.pipeline.methods.prompt_distillation import first_words, read_system_prompt
from posttrain.pipeline.results import (
    PREFERENCE_KEYS,
    SFT_KEYS,
    PreferenceExample,
    compare_examples,
    headline,
    validate_rows,
    validate_summary,
)
from posttrain.pipeline.settings import TrainConfig, parse_train_args

# The runs share the session's second engine (both tiny models, fp32) and run in this process (`train_here`).
TINY = ["renderer_name=role_colon", "lora_rank=4", "save_every=0", "eval_every=0"]


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("data") / "prompts.jsonl"
    rows = [{"prompt": f"Say the number {i}.", "completion": f"Number {i}. Done."} for i in range(40)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _summary(cwd: Path) -> dict:
    summary = json.loads((cwd / "results" / "summary.json").read_text())
    validate_summary(summary)
    return summary


def _ok(proc) -> None:
    # 1 = trained but not better: allowed for a few steps of a random tiny model; the schema is what is tested.
    assert proc.returncode in FINISHED, proc.stdout[-3000:] + proc.stderr[-3000:]


# ------------------------------------------------------------------------------------------- end to end


def test_dpo_run(tmp_path: Path, tiny_model: str, keyed_engine) -> None:
    data = tmp_path / "pairs.jsonl"
    rows = [  # the implicit-prompt form: whole conversations sharing the prompt
        {
            "chosen": [
                {"role": "user", "content": f"Say {i}."},
                {"role": "assistant", "content": f"{i}. Done."},
            ],
            "rejected": [{"role": "user", "content": f"Say {i}."}, {"role": "assistant", "content": "No."}],
        }
        for i in range(30)
    ]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    proc = train_here(
        [
            f"dataset={data}",
            f"model_name={tiny_model}",
            *TINY,
            "learning_rate=0.01",
            "batch_size=8",
            "max_steps=3",
            "dpo_beta=0.5",
            "run_name=dpo_e2e",
            f"base_url={keyed_engine.url}",
        ],
        tmp_path,
    )
    _ok(proc)  # a random tiny model may already rank all 3 held-out pairs right: the margin must grow
    assert "task: dpo (preference data)" in proc.stdout
    summary = _summary(tmp_path)
    assert (
        summary["task_type"] == "rl"
        and summary["method"] == "dpo"
        and summary["score_label"] == "preference accuracy"
    )
    assert summary["headline"].startswith("Base preference accuracy: ")
    assert summary["trained_score"] >= summary["baseline_score"]
    assert summary["trained_mean_margin"] > summary["baseline_mean_margin"] and summary["dpo_beta"] == 0.5
    base = read_jsonl(tmp_path / "results" / "base_model.jsonl")
    assert tuple(base[0]) == PREFERENCE_KEYS and len(base) == summary["sizes"]["eval_pairs"] == 3
    validate_rows(base, "score", "preference")
    assert base[0]["prompt"].startswith("user: Say ") and base[0]["rejected"] == "No."
    metrics = read_jsonl(tmp_path / "results" / "logs" / "dpo_e2e" / "dpo" / "metrics.jsonl")
    assert any("dpo_loss" in m for m in metrics)
    assert "Preference accuracy" in (tmp_path / "results" / "report.md").read_text()


@pytest.fixture(scope="module")
def off_policy_run(
    tmp_path_factory: pytest.TempPathFactory, tiny_model: str, tiny_model_b: str, prompts_file, keyed_engine
):
    cwd = tmp_path_factory.mktemp("off-policy")
    proc = train_here(
        [
            f"dataset={prompts_file}",
            f"model_name={tiny_model}",
            f"teacher_model={tiny_model_b}",
            *TINY,
            "learning_rate=0.01",
            "batch_size=8",
            "max_steps=3",
            "max_tokens=8",
            "run_name=distill_e2e",
            f"base_url={keyed_engine.url}",
        ],
        cwd,
    )
    return cwd, proc


def test_off_policy_distillation_run(off_policy_run, tiny_model_b: str) -> None:
    cwd, proc = off_policy_run
    _ok(proc)
    assert "task: distillation (teacher_model is set)" in proc.stdout
    summary = _summary(cwd)
    assert summary["task_type"] == "sft" and summary["method"] == "distillation"
    assert summary["dataset"]["distillation_mode"] == "off_policy"
    assert summary["dataset"]["train_on_what"] == "last_assistant_message"  # the document's row for traces
    assert summary["dataset"]["teacher_model"] == tiny_model_b
    data = cwd / "results" / "logs" / "distill_e2e" / "data"
    teacher_train, teacher_eval = (
        read_jsonl(data / "teacher_train.jsonl"),
        read_jsonl(data / "teacher_eval.jsonl"),
    )
    assert len(teacher_train) == summary["sizes"]["teacher_train_traces"] > 0
    assert teacher_train[0]["messages"][-1]["role"] == "assistant"
    rows = read_jsonl(cwd / "results" / "trained_model.jsonl")
    assert tuple(rows[0]) == SFT_KEYS and len(rows) == len(teacher_eval)
    validate_rows(rows, "nll")
    assert rows[0]["completion"] == teacher_eval[0]["messages"][-1]["content"]
    assert "baseline_reverse_kl" not in summary


def test_on_policy_distillation_from_a_checkpoint(
    tmp_path: Path, tiny_model: str, off_policy_run, keyed_engine
):
    teacher = _summary(off_policy_run[0])["checkpoint_path"]  # an earlier run's tinker:// checkpoint
    # Prompts from an RL environment: verifiable, so the student's task accuracy is measured too.
    proc = train_here(
        [
            "env=arithmetic",
            f"model_name={tiny_model}",
            f"teacher_model={teacher}",
            "task=distillation",
            "distillation_mode=on_policy",
            *TINY,
            "learning_rate=0.01",
            "batch_size=4",
            "group_size=2",
            "max_steps=2",
            "max_tokens=6",
            "max_eval_rows=6",
            "run_name=on_policy_e2e",
            f"base_url={keyed_engine.url}",
        ],
        tmp_path,
    )
    _ok(proc)
    summary = _summary(tmp_path)
    assert summary["dataset"]["distillation_mode"] == "on_policy"
    for key in ("baseline_reverse_kl", "trained_reverse_kl"):
        assert isinstance(summary[key], float)
    data = tmp_path / "results" / "logs" / "on_policy_e2e" / "data"
    for label, key in (("base", "baseline_task_accuracy"), ("trained", "trained_task_accuracy")):
        rows = read_jsonl(data / f"task_{label}.jsonl")
        assert len(rows) == summary["sizes"]["eval_prompts"] == 6
        assert summary[key] == pytest.approx(sum(r["correct"] for r in rows) / len(rows))
        assert all(r["ground_truth"] and r["completion"] is not None for r in rows)
    metrics = read_jsonl(tmp_path / "results" / "logs" / "on_policy_e2e" / "metrics.jsonl")
    assert any("teacher_kl" in m for m in metrics)


def test_prompt_distillation_run(tmp_path: Path, tiny_model: str, prompts_file: Path, keyed_engine) -> None:
    (tmp_path / "system.txt").write_text("Always answer in French.\n")
    (tmp_path / "check.py").write_text(
        "def has_vowel(row, answer):\n"
        "    assert row['messages'][-1]['role'] == 'user'\n"
        "    return any(c in 'aeiou' for c in answer)\n"
    )
    proc = train_here(
        [
            f"dataset={prompts_file}",
            f"model_name={tiny_model}",
            "system_prompt=@system.txt",
            *TINY,
            "learning_rate=0.01",
            "batch_size=8",
            "max_steps=2",
            "max_tokens=6",
            "run_name=prompt_e2e",
            "behaviour_check=check.py:has_vowel",
            f"base_url={keyed_engine.url}",
        ],
        tmp_path,
    )
    _ok(proc)
    summary = _summary(tmp_path)
    assert (
        summary["task_type"] == "sft"
        and summary["method"] == "prompt_distillation"
        and summary["system_prompt"] == "Always answer in French."
    )
    assert 0 <= summary["trained_behaviour_agreement"] <= 1
    # the cookbook's prompt_distillation
    assert summary["dataset"]["train_on_what"] == "all_assistant_messages"
    config = json.loads((tmp_path / "results" / "logs" / "prompt_e2e" / "config.json").read_text())
    assert config["dataset_builder"]["common_config"]["train_on_what"] == "all_assistant_messages"
    data = tmp_path / "results" / "logs" / "prompt_e2e" / "data"
    check = summary["behaviour_check"]
    assert check["function"] == "check.py:has_vowel" and check["errors"] == 0
    for name, key in (("teacher", "teacher_rate"), ("base", "baseline_rate"), ("trained", "trained_rate")):
        rows = read_jsonl(data / f"behaviour_{name}.jsonl")
        assert len(rows) == summary["sizes"]["eval_prompts"]
        # The user's check judged each answer, and the rate is their mean.
        assert all(r["behaviour"] == float(any(c in "aeiou" for c in r["answer"])) for r in rows)
        assert check[key] == pytest.approx(sum(r["behaviour"] for r in rows) / len(rows))
    # The student's traces carry no system prompt: that is what gets baked in.
    assert all(m["role"] != "system" for r in read_jsonl(data / "teacher_train.jsonl") for m in r["messages"])


def test_teacher_with_another_tokenizer_is_refused(
    tmp_path: Path, tiny_model: str, prompts_file: Path
) -> None:
    from transformers import AutoTokenizer

    other = tmp_path / "other-tokenizer"
    for f in Path(tiny_model).iterdir():
        (other / f.name).parent.mkdir(exist_ok=True)
        (other / f.name).write_bytes(f.read_bytes())
    tokenizer = AutoTokenizer.from_pretrained(str(other))
    tokenizer.add_tokens(["<extra_token_a>", "<extra_token_b>"])
    tokenizer.save_pretrained(str(other))
    with pytest.raises(ConfigError, match="different tokenizer.*tinker-cookbook #796"):
        check_same_tokenizer(tiny_model, str(other), "role_colon", "role_colon")
    with pytest.raises(ConfigError, match="uses the llama3 chat format but the student .* uses role_colon"):
        check_same_tokenizer(tiny_model, tiny_model, "role_colon", "llama3")
    proc = train_here(
        [
            f"dataset={prompts_file}",
            f"model_name={tiny_model}",
            f"teacher_model={other}",
            *TINY,
            "backend=local",
        ],
        tmp_path,
    )
    assert proc.returncode == 2 and "different tokenizer" in proc.stderr
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


# ------------------------------------------------------------------------------------ settings and data


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["task=sft", "teacher_model=x"], "teacher_model is only used by task=distillation, not task=sft"),
        (["task=dpo", "system_prompt=be nice"], "system_prompt is only used by task=prompt_distillation"),
        (["task=rl", "dpo_beta=0.2"], "dpo_beta is only used by task=dpo, not task=rl"),
        (["task=distillation"], "task=distillation needs teacher_model="),
        (["task=distillation", "distillation_mode=on_policy"], "task=distillation needs teacher_model="),
        (["task=prompt_distillation"], "task=prompt_distillation needs system_prompt="),
        (["task=sft", "behaviour_check=c.py:f"], "behaviour_check is only used by task=prompt_distillation"),
        (["dpo_beta=0"], "dpo_beta=0.0 is not valid; expected a number > 0"),
        (
            ["distillation_mode=sideways"],
            "distillation_mode='sideways' is not valid; allowed values: off_policy",
        ),
    ],
)
def test_method_settings_are_checked_in_one_line(args: list[str], message: str) -> None:
    with pytest.raises(ConfigError) as exc:
        parse_train_args(args)
    assert message in str(exc.value) and "\n" not in str(exc.value)


def _data(fmt: str, rows: list[dict]) -> LoadedData:
    return LoadedData(fmt, rows * 3, rows, "data.jsonl (local file)", "10% of training rows", [])


def test_auto_picks_the_method_from_the_settings() -> None:
    chat = _data(
        "messages", [{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}]
    )
    assert choose_task(TrainConfig(teacher_model="m"), chat)[0] == "distillation"
    assert (
        choose_task(TrainConfig(distillation_mode="on_policy", teacher_model="m"), chat)[0] == "distillation"
    )
    assert choose_task(TrainConfig(system_prompt="be brief"), chat)[0] == "prompt_distillation"
    with pytest.raises(ConfigError, match="task=distillation needs teacher_model"):
        choose_task(TrainConfig(distillation_mode="on_policy"), chat)
    with pytest.raises(ConfigError, match="system_prompt is only used by task=prompt_distillation"):
        choose_task(TrainConfig(teacher_model="m", system_prompt="x"), chat)


def test_dpo_refuses_data_that_is_not_pairs() -> None:
    from posttrain.pipeline.methods.dpo import DPO, DPOConfig

    chat = _data(
        "messages", [{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}]
    )
    with pytest.raises(ConfigError, match="task=dpo needs preference pairs.*messages format"):
        DPO(DPOConfig(), chat)


def test_preference_rows_hh_transcripts_and_their_errors() -> None:
    hh = normalize_row(
        {
            "chosen": "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: 2+2?\n\nAssistant: 4",
            "rejected": "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: 2+2?\n\nAssistant: 5",
        },
        "preference",
        "w",
    )
    assert (
        hh["chosen"] == "4"
        and hh["rejected"] == "5"
        and [m["role"] for m in hh["prompt"]] == ["user", "assistant", "user"]
    )
    with pytest.raises(DataError, match='d line 2: field "rejected" does not share the conversation'):
        normalize_row(
            {
                "chosen": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "x"}],
                "rejected": [{"role": "user", "content": "b"}, {"role": "assistant", "content": "y"}],
            },
            "preference",
            "d line 2",
        )
    with pytest.raises(DataError, match='d line 3: field "rejected" is the same text as "chosen"'):
        normalize_row({"prompt": "p", "chosen": "same", "rejected": " same"}, "preference", "d line 3")


def test_system_prompt_from_a_file_and_first_words(tmp_path: Path) -> None:
    (tmp_path / "p.txt").write_text("  Be brief.\n")
    assert read_system_prompt(f"@{tmp_path / 'p.txt'}") == "Be brief."
    with pytest.raises(ConfigError, match="system_prompt=@/no/such/file: cannot read"):
        read_system_prompt("@/no/such/file")
    assert first_words("Ahoy, matey! The answer is 4.") == ("ahoy", "matey", "the")


def test_a_missing_behaviour_check_stops_the_run_in_one_line(
    tmp_path: Path, tiny_model: str, prompts_file: Path
) -> None:
    (tmp_path / "check.py").write_text("def other(row, answer):\n    return True\n")
    proc = train_here(
        [
            f"dataset={prompts_file}",
            f"model_name={tiny_model}",
            "system_prompt=Be brief.",
            *TINY,
            "behaviour_check=check.py:in_french",
            "backend=local",
        ],
        tmp_path,
    )
    assert proc.returncode == 2 and "engine: starting" not in proc.stdout, proc.stderr[-2000:]
    # Loaded as a reward_fn= verifier is, but named by the setting the user wrote.
    assert proc.stderr == (
        "error: behaviour_check=check.py:in_french: check.py has no function 'in_french' (functions there: other)\n"
    )


def test_only_single_questions_with_an_answer_are_graded() -> None:
    question = [{"role": "user", "content": "What is 2 + 3?"}]
    assert gradable({"answer": 5}, question) == {
        "question": "What is 2 + 3?",
        "answer": "5",
        "instruction": "",
    }
    assert gradable({"answer": " "}, question) is None and gradable({}, question) is None
    two_turns = [{"role": "system", "content": "Be brief."}, *question]
    assert gradable({"answer": "5"}, two_turns) is None


def test_shipped_behaviour_checks() -> None:
    import importlib.util

    import posttrain

    path = Path(posttrain.__file__).parent / "data" / "behaviour_checks.py"
    spec = importlib.util.spec_from_file_location("behaviour_checks", path)
    assert spec is not None and spec.loader is not None
    checks = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(checks)
    assert checks.in_french({}, "La capitale de la France est Paris.")
    assert not checks.in_french({}, "The capital of France is Paris.")
    assert not checks.in_french({}, "Paris.")
    assert checks.one_sentence({}, "Paris is the capital.")
    assert not checks.one_sentence({}, "Paris. It is big.")


# ------------------------------------------------------------------------------------------- results


def test_preference_row_schema_and_comparison() -> None:
    base = [
        PreferenceExample(0, "p", "c", "r", -2.0, -1.0, -1.0, False).to_dict(),
        PreferenceExample(1, "p", "c", "r", None, None, None, None, error="timeout").to_dict(),
    ]
    trained = [
        PreferenceExample(0, "p", "c", "r", -1.0, -2.0, 1.0, True).to_dict(),
        PreferenceExample(1, "p", "c", "r", -1.0, -2.0, 1.0, True).to_dict(),
    ]
    validate_rows(base, "score", "preference")
    with pytest.raises(ValueError, match="margin must be a finite number"):
        validate_rows([{**trained[0], "margin": None}], "score", "preference")
    with pytest.raises(ValueError, match="keys must be exactly index, question"):
        validate_rows(trained, "score")  # the default schema for scores is RL's
    comparison = compare_examples(base, trained, "score")
    assert (comparison["improved"], comparison["errors"]) == (1, 1)
    assert comparison["top_improved"][0]["base_margin"] == -1.0
    summary = {"baseline_score": 0.5, "trained_score": 0.75, "score_label": "preference accuracy"}
    assert headline(summary) == "Base preference accuracy: 50.0% → Trained: 75.0% (+25.0 points)"
