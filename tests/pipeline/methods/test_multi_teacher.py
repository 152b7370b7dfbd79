"""Distillation with several teachers (`teacher_model=A,B dataset=a,b`, the cookbook's multi-teacher recipe):
end to end through `train.py` on the local engine with tiny models (on-policy and off-policy), the per-teacher
results, and the one-line errors for teachers and datasets that do not fit.

The two teachers are another tiny model and the student's own base model, served by one engine for both runs
(`keyed_engine`): the second teacher starts out agreeing with the student exactly (reverse KL 0), which shows
that each prompt is scored by its own dataset's teacher."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from runs import read_jsonl, train_here
from test_preference_distillation import TINY, _ok, _summary

from posttrain.errors import ConfigError
from posttrain.pipeline.data.sources import data_sources
from posttrain.pipeline.methods.distillation.prompts import split_evenly
from posttrain.pipeline.results import SFTExample, validate_rows, validate_summary
from posttrain.pipeline.settings import TrainConfig, parse_train_args


@pytest.fixture(scope="module")
def datasets(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Two prompt sources in two formats: numbers (prompt/completion) and letters (chat messages)."""
    root = tmp_path_factory.mktemp("data")
    numbers, letters = root / "numbers.jsonl", root / "letters.jsonl"
    numbers.write_text(
        "".join(
            json.dumps({"prompt": f"Say the number {i}.", "completion": f"{i}."}) + "\n" for i in range(20)
        )
    )
    letters.write_text(
        "".join(
            json.dumps(
                {
                    "messages": [
                        {"role": "user", "content": f"Spell the letter {c}."},
                        {"role": "assistant", "content": c},
                    ]
                }
            )
            + "\n"
            for c in "abcdefghijklmnopqrst"
        )
    )
    return numbers, letters


def _check_teachers(summary: dict, cwd: Path, run: str, teachers: list[str], mode: str) -> list[dict]:
    """The per-teacher fields agree with the rows and the traces; the overall NLL pools them."""
    assert summary["dataset"]["teacher_model"] == ",".join(teachers)
    assert summary["dataset"]["distillation_mode"] == mode
    entries = summary["teachers"]
    assert [t["teacher_model"] for t in entries] == teachers
    assert [t["dataset"].split(" ")[0].rsplit("/", 1)[-1] for t in entries] == [
        "numbers.jsonl",
        "letters.jsonl",
    ]
    assert sum(t["eval_prompts"] for t in entries) == summary["sizes"]["eval_prompts"]
    assert sum(t["train_prompts"] for t in entries) == summary["sizes"]["train_prompts"]
    for side in ("baseline", "trained"):
        values = [t[f"{side}_nll"] for t in entries]
        assert all(isinstance(v, float) for v in values)
        # Token-weighted over all held-out prompts: between the teachers' own means.
        assert min(values) - 1e-9 <= summary[f"{side}_nll"] <= max(values) + 1e-9

    data = cwd / "results" / "logs" / run / "data"
    held_out = read_jsonl(data / "teacher_eval.jsonl")
    assert [sum(r["teacher"] == t for r in held_out) for t in teachers] == [
        t["teacher_eval_traces"] for t in entries
    ]
    # Each teacher answered its own prompts only: numbers to the first, letters to the second.
    assert all(("number" in r["messages"][0]["content"]) == (r["teacher"] == teachers[0]) for r in held_out)
    for name in ("base_model.jsonl", "trained_model.jsonl"):
        rows = read_jsonl(cwd / "results" / name)
        validate_rows(rows, "nll")
        assert [r["teacher"] for r in rows] == [r["teacher"] for r in held_out]
    report = (cwd / "results" / "report.md").read_text()
    assert "## Per teacher" in report and all(t in report for t in teachers)
    return entries


def test_on_policy_with_two_teachers(
    tmp_path: Path, keyed_engine, tiny_model: str, tiny_model_b: str, datasets: tuple[Path, Path]
) -> None:
    teachers = [tiny_model_b, tiny_model]
    proc = train_here(
        [
            f"dataset={datasets[0]},{datasets[1]}",
            f"model_name={tiny_model}",
            f"teacher_model={','.join(teachers)}",
            "distillation_mode=on_policy",
            f"base_url={keyed_engine.url}",
            *TINY,
            "learning_rate=0.01",
            "batch_size=3",
            "group_size=2",
            "max_steps=2",
            "max_tokens=6",
            "run_name=multi_on",
        ],
        tmp_path,
    )
    _ok(proc)
    assert "task: distillation (teacher_model is set)" in proc.stdout
    assert f"teacher 1 {tiny_model}: " in proc.stdout and "1 prompts per step" in proc.stdout
    summary = _summary(tmp_path)
    entries = _check_teachers(summary, tmp_path, "multi_on", teachers, "on_policy")
    assert [t["prompts_per_step"] for t in entries] == [2, 1]  # batch_size=3 shared out
    assert [t["training_metric"] for t in entries] == ["teacher_kl/dataset_0", "teacher_kl/dataset_1"]
    for side in ("baseline", "trained"):
        kls = [t[f"{side}_reverse_kl"] for t in entries]
        assert all(isinstance(v, float) for v in kls)  # a one-sample estimate per prompt: may be < 0
        assert min(kls) - 1e-9 <= summary[f"{side}_reverse_kl"] <= max(kls) + 1e-9
    # The base model against itself (teacher 1) vs against another model (teacher 0).
    assert abs(entries[1]["baseline_reverse_kl"]) < 1e-4 < abs(entries[0]["baseline_reverse_kl"])

    data = tmp_path / "results" / "logs" / "multi_on" / "data"
    for k, entry in enumerate(entries):
        assert len(read_jsonl(data / f"train_prompts_{k}.jsonl")) == entry["train_prompts"]
    metrics = read_jsonl(tmp_path / "results" / "logs" / "multi_on" / "metrics.jsonl")
    assert len(metrics) == 2
    for m in metrics:  # the cookbook's per-dataset metrics: teacher K's KL and its own env tag
        assert {"teacher_kl", "teacher_kl/dataset_0", "teacher_kl/dataset_1"} <= set(m)
        assert any(key.startswith("env/teacher_1/") for key in m)


def test_off_policy_with_two_teachers(
    tmp_path: Path, keyed_engine, tiny_model: str, tiny_model_b: str, datasets: tuple[Path, Path]
) -> None:
    teachers = [tiny_model_b, tiny_model]
    proc = train_here(
        [
            f"dataset={datasets[0]},{datasets[1]}",
            f"model_name={tiny_model}",
            f"teacher_model={','.join(teachers)}",
            "task=distillation",
            f"base_url={keyed_engine.url}",
            *TINY,
            "learning_rate=0.01",
            "batch_size=8",
            "max_steps=2",
            "max_tokens=6",
            "max_train_rows=20",
            "max_eval_rows=2",
            "run_name=multi_off",
        ],
        tmp_path,
    )
    _ok(proc)
    summary = _summary(tmp_path)
    entries = _check_teachers(summary, tmp_path, "multi_off", teachers, "off_policy")
    # max_train_rows and max_eval_rows shared out: 10 rows of each dataset, 1 of them held out.
    assert [(t["train_prompts"], t["eval_prompts"]) for t in entries] == [(9, 1), (9, 1)]
    assert "baseline_reverse_kl" not in summary and "prompts_per_step" not in entries[0]
    trained_on = read_jsonl(tmp_path / "results" / "logs" / "multi_off" / "data" / "teacher_train.jsonl")
    assert [sum(r["teacher"] == t for r in trained_on) for t in teachers] == [
        t["teacher_train_traces"] for t in entries
    ]


# ------------------------------------------------------------------------------------------- settings


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["teacher_model=a,,b", "dataset=x,y"], "teacher_model='a,,b' has an empty name"),
        (["teacher_model=a,", "dataset=x,y"], "teacher_model='a,' has an empty name"),
        (["teacher_model=a, b,a", "dataset=x,y,z"], "teacher_model names a twice"),
        (["teacher_model=a,b"], "teacher_model names 2 teachers: give one prompt dataset per teacher"),
        (["teacher_model=a,b", "dataset=x"], "teacher_model names 2 teachers but dataset names 1; give one"),
        (["teacher_model=a,b", "dataset=x,y,z"], "teacher_model names 2 teachers but dataset names 3"),
        (["teacher_model=a,b", "dataset=x,"], "dataset='x,' has an empty name"),
        (["teacher_model=a,b", "env=math"], "their prompts come from dataset= (one per teacher"),
        (
            ["teacher_model=a,b", "dataset=x,y", "eval_dataset=e"],
            "eval_dataset='e' does not fit the 2 datasets",
        ),
        (
            ["teacher_model=a,b", "dataset=x,y", "dataset_split=t,u,v"],
            "dataset_split='t,u,v' does not fit the 2",
        ),
        (
            ["teacher_model=a,b", "dataset=x,y", "max_eval_rows=1"],
            "max_eval_rows=1 is fewer than the 2 datasets",
        ),
        (
            ["teacher_model=a,b,c", "dataset=x,y,z", "distillation_mode=on_policy", "batch_size=2"],
            "batch_size=2 is fewer than the 3 teachers",
        ),
        (["task=sft", "teacher_model=a,b", "dataset=x,y"], "teacher_model is only used by task=distillation"),
    ],
)
def test_teachers_that_do_not_fit_are_refused_in_one_line(args: list[str], message: str) -> None:
    with pytest.raises(ConfigError) as exc:
        parse_train_args(args)
    assert message in str(exc.value) and "\n" not in str(exc.value)


def test_data_sources_one_per_teacher() -> None:
    cfg = parse_train_args(
        [
            "teacher_model=a, b",
            "dataset=x.jsonl, hub/y",
            "dataset_config=main",
            "eval_split=test,validation",
            "max_train_rows=101",
            "max_eval_rows=10",
        ]
    )
    first, second = data_sources(cfg)
    assert (first.dataset, second.dataset) == ("x.jsonl", "hub/y")
    assert first.dataset_config == second.dataset_config == "main"  # one value for every dataset
    assert (first.eval_split, second.eval_split) == ("test", "validation")
    assert (first.max_train_rows, first.max_eval_rows) == (50, 5)  # the run keeps to its limits
    # One teacher: dataset= is taken as given, commas and all (a single file or Hub name).
    single = data_sources(TrainConfig(teacher_model="a", dataset="x,y.jsonl"))
    assert [s.dataset for s in single] == ["x,y.jsonl"]
    assert split_evenly(9, 2) == [5, 4] and split_evenly(4, 4) == [1, 1, 1, 1]


def test_sft_rows_carry_their_teacher_and_summary_teachers_are_checked() -> None:
    row = SFTExample(0, "p", "c", 1.5, teacher="t").to_dict()
    assert row == {"index": 0, "prompt": "p", "completion": "c", "nll": 1.5, "teacher": "t"}
    assert "teacher" not in SFTExample(0, "p", "c", 1.5).to_dict()
    validate_rows([row], "nll")
    with pytest.raises(ValueError, match="teacher must be a non-empty string"):
        validate_rows([{**row, "teacher": ""}], "nll")
    summary = {
        "task_type": "sft",
        "method": "distillation",
        "tinker_run_id": "r",
        "log_path": "l",
        "model": "m",
        "backend": "local",
        "wandb_url": "w",
        "baseline_nll": 2.0,
        "trained_nll": 1.0,
        "verdict": "improved",
        "improvement": {"absolute": 1.0},
        "hyperparameters": {},
        "versions": {},
    }
    teacher = {
        "teacher_model": "a",
        "dataset": "x",
        "train_prompts": 4,
        "eval_prompts": 1,
        "teacher_train_traces": 4,
        "teacher_eval_traces": 1,
        "baseline_nll": 2.0,
        "trained_nll": None,
    }
    validate_summary({**summary, "teachers": [teacher, {**teacher, "teacher_model": "b"}]})
    with pytest.raises(ValueError, match="teachers must be a list of at least 2"):
        validate_summary({**summary, "teachers": [teacher]})
    with pytest.raises(ValueError, match=r"teachers\[1\].baseline_nll must be a finite number"):
        validate_summary({**summary, "teachers": [teacher, {**teacher, "baseline_nll": -1.0}]})


def test_every_teacher_gets_the_tokenizer_check(tmp_path: Path, tiny_model: str, tiny_model_b: str) -> None:
    from transformers import AutoTokenizer

    from posttrain.pipeline.data import LoadedData
    from posttrain.pipeline.methods.distillation.method import Distillation
    from posttrain.pipeline.settings import method_config

    other = tmp_path / "other-tokenizer"
    other.mkdir()
    for f in Path(tiny_model).iterdir():
        (other / f.name).write_bytes(f.read_bytes())
    tokenizer = AutoTokenizer.from_pretrained(str(other))
    tokenizer.add_tokens(["<extra_token_a>"])
    tokenizer.save_pretrained(str(other))
    rows = [{"question": f"q{i}", "answer": "a"} for i in range(3)]
    part = LoadedData("question_answer", rows, rows[:1], "x.jsonl (local file)", "10%", [])
    data = LoadedData(**{**part.__dict__, "others": (part,)})
    args = [f"model_name={tiny_model}", "renderer_name=role_colon", "dataset=x.jsonl,y.jsonl"]

    def distillation(teachers: str) -> Distillation:
        return Distillation(
            method_config(parse_train_args([*args, f"teacher_model={teachers}"]), "distillation"), data
        )

    fine = distillation(f"{tiny_model_b},{tiny_model}")
    assert [s.teacher_model for s in fine.shares] == [tiny_model_b, tiny_model]
    assert fine.extra_models == [tiny_model_b]  # the student's own model is served anyway
    assert (
        len(fine.prompts.train) == 6
        and fine.prompts.source["source"] == "x.jsonl (local file) + x.jsonl (local file)"
    )
    with pytest.raises(ConfigError, match=f"^teacher_model={other} has a different tokenizer"):
        distillation(f"{tiny_model_b},{other}")
    # A teacher that exists nowhere is "not found", not a chat format that differs (guessed from its name).
    with pytest.raises(
        ConfigError, match=r"^teacher_model=nobody/no-such-model: not found: not a local directory"
    ):
        distillation(f"{tiny_model_b},nobody/no-such-model")


def test_a_teacher_the_service_refuses_is_named_by_the_users_setting() -> None:
    import asyncio
    from types import SimpleNamespace

    from posttrain.pipeline.methods.distillation.prompts import Prompts, Share
    from posttrain.pipeline.methods.distillation.teachers import Teacher, TeacherPool

    async def not_served(**_: object) -> None:
        raise RuntimeError("model not served")

    async def no_run(path: str) -> None:
        raise RuntimeError("no such run")

    rest = SimpleNamespace(get_training_run_by_tinker_path=no_run)
    ctx = SimpleNamespace(
        service=SimpleNamespace(create_sampling_client=not_served, create_rest_client=lambda: rest)
    )
    prompts = Prompts([], [], {})

    def refusal(teacher_model: str, fixed: Teacher | None = None) -> str:
        with pytest.raises(ConfigError) as exc:
            asyncio.run(TeacherPool(ctx, [Share(teacher_model, prompts)], fixed).get(0))  # type: ignore[arg-type]
        return str(exc.value)

    assert refusal("a/teacher") == "teacher_model=a/teacher: RuntimeError: model not served"
    assert refusal("tinker://r/sampler_weights/1") == (
        "teacher_model=tinker://r/sampler_weights/1: cannot find this checkpoint (RuntimeError: no such run)"
    )
    # Prompt distillation's teacher is the base model itself, which the user named with model_name=.
    assert refusal("base/m", Teacher("base/m", None, "Be brief.")) == (
        "model_name=base/m (the teacher, with system_prompt=): RuntimeError: model not served"
    )
