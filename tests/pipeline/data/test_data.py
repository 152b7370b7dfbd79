"""Data loading: format detection, normalization, size limits, Hub streaming (mocked) and error messages."""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import datasets
import pandas as pd
import pytest
from runs import data_error, write_jsonl

from posttrain.pipeline.data.formats import detect_format, normalize_row
from posttrain.pipeline.data.load import DataRequest, LoadedData, default_train_on_what, load_data, read_rows


def chat(i: int = 0) -> dict:
    return {"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]}


@pytest.fixture(autouse=True)
def no_hub(monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest) -> None:
    """Any Hub access a test did not explicitly mock fails loudly instead of touching the network.

    Tests of a dataset repository on disk (the `hub_repo` fixture) run the real `datasets` code, offline."""

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError(f"unexpected Hugging Face Hub access: {args} {kwargs}")

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    if "hub_repo" in request.fixturenames:
        return
    monkeypatch.setattr(datasets, "load_dataset", refuse)
    monkeypatch.setattr(datasets, "get_dataset_split_names", refuse)


# --- detection and normalization -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("row", "expected"),
    [
        (chat(), "messages"),
        ({"conversations": [{"from": "human", "value": "x"}, {"from": "gpt", "value": "y"}]}, "sharegpt"),
        ({"instruction": "do", "input": "", "output": "done"}, "instruction"),
        ({"prompt": "p", "completion": "c"}, "prompt_completion"),
        ({"question": "q", "answer": "a"}, "question_answer"),
        ({"problem": "q", "solution": "s"}, "question_answer"),
        ({"question": "q", "ground_truth": "1"}, "question_answer"),
        ({"prompt": "q", "ground_truth": "1"}, "question_answer"),
        ({"problem": "q", "answer": "1"}, "question_answer"),
        # Preference rows must win even when they also look like prompt/completion.
        ({"prompt": "p", "completion": "c", "chosen": "a", "rejected": "b"}, "preference"),
        # messages is checked before instruction/output and prompt/completion.
        ({**chat(), "prompt": "p", "completion": "c"}, "messages"),
    ],
)
def test_detect_format(row: dict, expected: str) -> None:
    assert detect_format(row, "x.jsonl line 1") == expected


def test_detect_format_unknown_names_where_and_fields() -> None:
    message = data_error(lambda: detect_format({"text": "hello", "label": 1}, "x.jsonl line 4"))
    assert message.startswith("x.jsonl line 4: no known data format")
    assert "label, text" in message


def test_messages_normalized_and_extra_keys_dropped() -> None:
    row = {
        "messages": [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": [{"type": "text", "text": "hi "}, {"type": "text", "text": "there"}]},
            {"role": "assistant", "content": "hello", "name": "bot"},
        ]
    }
    assert normalize_row(row, "messages", "w") == {
        "messages": [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": "hi there"},
            {"role": "assistant", "content": "hello"},
        ]
    }


def test_sharegpt_roles_mapped() -> None:
    row = {
        "conversations": [
            {"from": "system", "value": "sys"},
            {"from": "human", "value": "hi"},
            {"from": "gpt", "value": "hello"},
            {"role": "user", "content": "more"},
            {"from": "gpt", "value": "sure"},
        ]
    }
    messages = normalize_row(row, "sharegpt", "w")["messages"]
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "user", "assistant"]
    assert [m["content"] for m in messages] == ["sys", "hi", "hello", "more", "sure"]


def test_sharegpt_unknown_role_names_field() -> None:
    row = {"conversations": [{"from": "robot", "value": "x"}, {"from": "gpt", "value": "y"}]}
    message = data_error(lambda: normalize_row(row, "sharegpt", "s.jsonl line 2"))
    assert 's.jsonl line 2: field "conversations[0].from"' in message
    assert "'robot'" in message


def test_instruction_input_joined_and_system_kept() -> None:
    with_input = normalize_row(
        {"instruction": "Add", "input": "2+2", "output": "4", "system": "math"}, "instruction", "w"
    )
    assert with_input["messages"] == [
        {"role": "system", "content": "math"},
        {"role": "user", "content": "Add\n\n2+2"},
        {"role": "assistant", "content": "4"},
    ]
    without_input = normalize_row(
        {"instruction": "Say hi", "input": "  ", "output": "hi"}, "instruction", "w"
    )
    assert without_input["messages"][0] == {"role": "user", "content": "Say hi"}
    assert len(without_input["messages"]) == 2


def test_prompt_completion_strings_and_message_lists() -> None:
    plain = normalize_row({"prompt": "2+2?", "completion": "4"}, "prompt_completion", "w")
    assert plain["messages"] == [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]
    as_lists = normalize_row(
        {
            "prompt": [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}],
            "completion": [{"role": "assistant", "content": "a"}],
        },
        "prompt_completion",
        "w",
    )
    assert [m["role"] for m in as_lists["messages"]] == ["system", "user", "assistant"]


@pytest.mark.parametrize(
    ("row", "question", "final"),
    [
        ({"question": "q", "answer": "Natalia sold 48/2 = 24.\n#### 1,072"}, "q", "1072"),
        ({"problem": "p", "solution": r"So $x = \boxed{\frac{1}{\sqrt{2}}}$."}, "p", r"\frac{1}{\sqrt{2}}"),
        ({"problem": "p", "solution": r"first \boxed{1}, finally \boxed{2}"}, "p", "2"),
        ({"question": "q", "ground_truth": 42}, "q", "42"),
        ({"prompt": "q", "ground_truth": "  Paris \n"}, "q", "Paris"),
        ({"problem": "p", "answer": "7"}, "p", "7"),
    ],
)
def test_question_answer_final_answer(row: dict, question: str, final: str) -> None:
    normalized = normalize_row(row, "question_answer", "w")
    assert normalized["question"] == question
    assert normalized["final_answer"] == final
    # The full answer (reasoning included) is kept for graders and SFT.
    original = next(v for k, v in row.items() if k in ("answer", "solution", "ground_truth"))
    assert normalized["answer"] == str(original)


def test_preference_strings_and_message_lists() -> None:
    plain = normalize_row({"prompt": "p", "chosen": "good", "rejected": "bad"}, "preference", "w")
    assert plain == {"prompt": [{"role": "user", "content": "p"}], "chosen": "good", "rejected": "bad"}
    ultrafeedback = normalize_row(
        {
            "prompt": "p",
            "chosen": [{"role": "user", "content": "p"}, {"role": "assistant", "content": "good"}],
            "rejected": [{"role": "user", "content": "p"}, {"role": "assistant", "content": "bad"}],
        },
        "preference",
        "w",
    )
    assert ultrafeedback == plain
    # No prompt column: the turns before the final answer in "chosen" are the prompt.
    hh_style = normalize_row(
        {
            "chosen": [{"role": "user", "content": "p"}, {"role": "assistant", "content": "good"}],
            "rejected": [{"role": "user", "content": "p"}, {"role": "assistant", "content": "bad"}],
        },
        "preference",
        "w",
    )
    assert hh_style == plain


@pytest.mark.parametrize(
    ("row", "fmt", "expected"),
    [
        (
            {"messages": "hello"},
            "messages",
            'd.jsonl line 7: field "messages" must be a non-empty list of {role, content} objects, got str',
        ),
        (
            {"messages": [{"role": "user", "content": "q"}]},
            "messages",
            'd.jsonl line 7: field "messages" must end with an assistant message',
        ),
        (
            {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": " "}]},
            "messages",
            'd.jsonl line 7: field "messages[1].content" (the last assistant message) is empty',
        ),
        (
            {"messages": [{"role": "user", "content": 3}, {"role": "assistant", "content": "a"}]},
            "messages",
            'd.jsonl line 7: field "messages[0].content" must be a string, got int',
        ),
        ({"instruction": "i", "output": ""}, "instruction", 'd.jsonl line 7: field "output" is empty'),
        ({"question": "q", "answer": None}, "question_answer", 'd.jsonl line 7: field "answer" is missing'),
        ({"chosen": "a", "rejected": "b"}, "preference", 'd.jsonl line 7: field "prompt" is missing'),
        (
            {"prompt": "p", "chosen": "a", "rejected": ["x"]},
            "preference",
            'd.jsonl line 7: field "rejected[0]" must be a {role, content} object, got str',
        ),
    ],
)
def test_normalize_errors_name_where_and_field(row: dict, fmt: Any, expected: str) -> None:
    assert data_error(lambda: normalize_row(row, fmt, "d.jsonl line 7")).startswith(expected)


# --- reading local files -----------------------------------------------------------------------------


def test_read_rows_jsonl_counts_physical_lines(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(chat(1)) + "\n\n   \n" + json.dumps(chat(2)) + "\n", encoding="utf-8")
    assert [where for where, _ in read_rows(str(path))] == [f"{path} line 1", f"{path} line 4"]


@pytest.mark.parametrize("container", ["list", "data", "rows"])
def test_json_file(tmp_path: Path, container: str) -> None:
    rows = [{"instruction": f"i{k}", "output": f"o{k}"} for k in range(10)]
    document: Any = rows if container == "list" else {container: rows}
    path = tmp_path / "d.json"
    path.write_text(json.dumps(document), encoding="utf-8")
    loaded = load_data(DataRequest(str(path)))
    assert loaded.format == "instruction"
    assert len(loaded.train) + len(loaded.eval) == 10
    assert [where for where, _ in read_rows(str(path))][2] == f"{path} row 3"


def test_json_file_without_a_list_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "d.json"
    path.write_text(json.dumps({"items": [chat()]}), encoding="utf-8")
    message = data_error(lambda: load_data(DataRequest(str(path))))
    assert message.startswith(f"{path}: expected a JSON list of objects")


def test_csv_file_parses_json_message_cells(tmp_path: Path) -> None:
    path = tmp_path / "d.csv"
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["messages", "id"])
        for k in range(10):
            writer.writerow([json.dumps(chat(k)["messages"]), str(k)])
    loaded = load_data(DataRequest(str(path)))
    assert loaded.format == "messages"
    assert sorted(r["messages"][0]["content"] for r in loaded.train + loaded.eval) == sorted(
        f"q{k}" for k in range(10)
    )


def test_csv_plain_columns_and_line_numbers(tmp_path: Path) -> None:
    path = tmp_path / "d.csv"
    path.write_text('prompt,completion\n"[not json, just text",ok\n"two\nlines",fine\n,\n', encoding="utf-8")
    rows = list(read_rows(str(path)))
    # The multi-line record starts on line 3; the empty record on line 5 is skipped.
    assert [where for where, _ in rows] == [f"{path} line 2", f"{path} line 3"]
    assert rows[0][1] == {"prompt": "[not json, just text", "completion": "ok"}
    assert (
        normalize_row(rows[1][1], "prompt_completion", rows[1][0])["messages"][0]["content"] == "two\nlines"
    )


def test_csv_bad_messages_cell_names_line_and_column(tmp_path: Path) -> None:
    path = tmp_path / "d.csv"
    path.write_text('messages\n"[{""role"": ""user""}, oops]"\n', encoding="utf-8")
    message = data_error(lambda: load_data(DataRequest(str(path))))
    assert message.startswith(f'{path} line 2: field "messages" looks like a JSON list')


def test_parquet_file(tmp_path: Path) -> None:
    path = tmp_path / "d.parquet"
    pd.DataFrame([chat(k) for k in range(20)]).to_parquet(path)
    loaded = load_data(DataRequest(str(path)))
    assert loaded.format == "messages"
    assert loaded.source == f"{path} (local file)"
    assert len(loaded.train) == 18 and len(loaded.eval) == 2
    assert sorted(loaded.train + loaded.eval, key=lambda r: int(r["messages"][0]["content"][1:])) == [
        chat(k) for k in range(20)
    ]


def test_each_format_loads_from_jsonl(tmp_path: Path) -> None:
    samples = {
        "messages": chat(),
        "prompt_completion": {"prompt": "p", "completion": "c"},
        "instruction": {"instruction": "i", "input": "x", "output": "o"},
        "sharegpt": {"conversations": [{"from": "human", "value": "h"}, {"from": "gpt", "value": "g"}]},
        "question_answer": {"question": "q", "answer": "#### 5"},
        "preference": {"prompt": "p", "chosen": "c", "rejected": "r"},
    }
    for fmt, row in samples.items():
        loaded = load_data(DataRequest(str(write_jsonl(tmp_path / f"{fmt}.jsonl", [row] * 5))))
        assert loaded.format == fmt
        assert len(loaded.train) == 4 and len(loaded.eval) == 1
        assert loaded.train[0] == normalize_row(row, fmt, "w")  # type: ignore[arg-type]


# --- limits and eval -----------------------------------------------------------------------------------


def test_local_limits_20k_train_10pct_eval_and_rest_unread(tmp_path: Path) -> None:
    path = tmp_path / "big.jsonl"
    lines = [json.dumps({"prompt": f"p{k}", "completion": f"c{k}"}) for k in range(25_000)]
    lines[23_999] = "{this line is broken"  # past the cap: must never be parsed
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    loaded = load_data(DataRequest(str(path)))
    assert len(loaded.train) == 18_000
    assert len(loaded.eval) == 2_000
    assert loaded.eval_source == "10% of training rows (seed 42)"
    seen = {r["messages"][0]["content"] for r in loaded.train + loaded.eval}
    assert seen == {f"p{k}" for k in range(20_000)}
    assert any("first 20,000" in note for note in loaded.notes)


def test_eval_is_ten_percent_disjoint_and_seeded(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", [chat(k) for k in range(50)])
    first, second = load_data(DataRequest(str(path))), load_data(DataRequest(str(path)))
    assert len(first.eval) == 5 and len(first.train) == 45
    assert first.eval == second.eval
    train_ids = {r["messages"][0]["content"] for r in first.train}
    eval_ids = {r["messages"][0]["content"] for r in first.eval}
    assert not train_ids & eval_ids and len(train_ids | eval_ids) == 50
    assert load_data(DataRequest(str(path), seed=7)).eval != first.eval


@pytest.mark.parametrize(("n", "n_eval"), [(2, 1), (9, 1), (30, 3)])  # 1 row: refused, see below
def test_small_datasets_keep_at_least_one_eval_row(tmp_path: Path, n: int, n_eval: int) -> None:
    loaded = load_data(DataRequest(str(write_jsonl(tmp_path / "d.jsonl", [chat(k) for k in range(n)]))))
    assert (len(loaded.train), len(loaded.eval)) == (n - n_eval, n_eval)


def test_custom_caps(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", [chat(k) for k in range(300)])
    loaded = load_data(DataRequest(str(path), max_train_rows=200, max_eval_rows=5))
    assert (len(loaded.train), len(loaded.eval)) == (195, 5)


def test_eval_dataset_file(tmp_path: Path) -> None:
    train = write_jsonl(tmp_path / "train.jsonl", [chat(k) for k in range(300)])
    evals = write_jsonl(tmp_path / "eval.jsonl", [{"prompt": f"e{k}", "completion": "x"} for k in range(30)])
    loaded = load_data(DataRequest(str(train), eval_dataset=str(evals), max_eval_rows=12))
    assert len(loaded.train) == 300  # nothing carved out
    assert [r["messages"][0]["content"] for r in loaded.eval] == [f"e{k}" for k in range(12)]
    assert loaded.eval_source == str(evals)
    assert loaded.format == "messages"


def test_a_given_eval_set_is_capped_at_10_percent_of_training(tmp_path: Path) -> None:
    train = write_jsonl(tmp_path / "train.jsonl", [chat(k) for k in range(300)])
    evals = write_jsonl(tmp_path / "eval.jsonl", [{"prompt": f"e{k}", "completion": "x"} for k in range(200)])
    loaded = load_data(DataRequest(str(train), eval_dataset=str(evals)))
    drawn = [int(r["messages"][0]["content"][1:]) for r in loaded.eval]
    assert len(drawn) == 30 and drawn == sorted(set(drawn))  # 10% of 300, distinct rows, in file order
    assert drawn == [
        int(r["messages"][0]["content"][1:])
        for r in load_data(DataRequest(str(train), eval_dataset=str(evals))).eval
    ]
    assert drawn != list(range(30))  # drawn from the whole set, not its head
    assert loaded.eval_source == f"{evals}: 30 rows drawn with seed 42 (10% of training)"
    assert (
        f"eval: 30 of the 200 rows of {evals}, drawn with seed 42 (10% of the 300 training rows"
        in loaded.notes[-1]
    )
    few = load_data(
        DataRequest(
            str(write_jsonl(tmp_path / "few.jsonl", [chat(k) for k in range(5)])), eval_dataset=str(evals)
        )
    )
    assert len(few.eval) == 1  # 10% of 5 rounds down; one row is the least an evaluation can be


def test_eval_dataset_with_other_kind_of_rows_is_rejected(tmp_path: Path) -> None:
    train = write_jsonl(tmp_path / "train.jsonl", [chat(k) for k in range(3)])
    evals = write_jsonl(tmp_path / "eval.jsonl", [{"question": "q", "answer": "a"}])
    message = data_error(lambda: load_data(DataRequest(str(train), eval_dataset=str(evals))))
    assert str(evals) in message and '"question_answer"' in message and '"messages"' in message


# --- errors from files -----------------------------------------------------------------------------------


def test_malformed_json_line_far_into_file_is_reported(tmp_path: Path) -> None:
    lines = [json.dumps(chat(k)) for k in range(9_500)]
    lines[8_999] = '{"messages": [oops]}'
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(lines), encoding="utf-8")
    message = data_error(lambda: load_data(DataRequest(str(path))))
    assert message.startswith(f"{path} line 9000: invalid JSON")


def test_non_object_json_line(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", [chat(), [1, 2]])
    assert (
        data_error(lambda: load_data(DataRequest(str(path))))
        == f"{path} line 2: expected one JSON object per line, got list"
    )


def test_missing_field_in_later_row(tmp_path: Path) -> None:
    rows = [{"instruction": "i", "output": "o"}] * 3 + [{"instruction": "i", "response": "o"}]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    message = data_error(lambda: load_data(DataRequest(str(path))))
    assert message.startswith(f'{path} line 4: field "output" is missing')


def test_mixed_formats_across_rows(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", [chat(), chat(), {"prompt": "p", "completion": "c"}])
    message = data_error(lambda: load_data(DataRequest(str(path))))
    assert message.startswith(f'{path} line 3: field "messages" is missing')
    assert '"messages"' in message and '"prompt_completion"' in message


def test_mixed_question_answer_field_pairs(tmp_path: Path) -> None:
    path = write_jsonl(
        tmp_path / "d.jsonl", [{"question": "q", "answer": "1"}, {"problem": "p", "solution": "2"}]
    )
    assert data_error(lambda: load_data(DataRequest(str(path)))).startswith(
        f'{path} line 2: field "question" is missing'
    )


def test_invalid_row_reports_field(tmp_path: Path) -> None:
    bad = {"messages": [{"role": "user", "content": "q"}, {"role": "bot", "content": "a"}]}
    path = write_jsonl(tmp_path / "d.jsonl", [chat(), bad])
    message = data_error(lambda: load_data(DataRequest(str(path))))
    assert message.startswith(f'{path} line 2: field "messages[1].role" must be one of')


@pytest.mark.parametrize("content", ["", "\n\n  \n"])
def test_empty_file(tmp_path: Path, content: str) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text(content, encoding="utf-8")
    assert data_error(lambda: load_data(DataRequest(str(path)))) == f"{path}: no rows found (it is empty)"


def test_unknown_extension(tmp_path: Path) -> None:
    path = tmp_path / "d.txt"
    path.write_text("hello\n", encoding="utf-8")
    message = data_error(lambda: load_data(DataRequest(str(path))))
    assert message.startswith(f'{path}: unsupported file type ".txt"')
    assert ".jsonl" in message and ".parquet" in message


def test_missing_file_is_not_sent_to_the_hub(tmp_path: Path) -> None:
    # The autouse fixture makes any Hub call fail the test, so this proves no lookup happened.
    assert (
        data_error(lambda: load_data(DataRequest("no_such_data.jsonl")))
        == "no_such_data.jsonl: file not found"
    )
    missing_eval = str(tmp_path / "eval.jsonl")
    train = write_jsonl(tmp_path / "train.jsonl", [chat()])
    assert (
        data_error(lambda: load_data(DataRequest(str(train), eval_dataset=missing_eval)))
        == f"{missing_eval}: file not found"
    )


# --- Hugging Face Hub (mocked, no network) -------------------------------------------------------------


class FakeHub:
    """Stands in for `datasets.load_dataset`: returns real IterableDatasets and records every call."""

    def __init__(self, splits: dict[str, datasets.IterableDataset]) -> None:
        self.splits = splits
        self.calls: list[tuple[tuple, dict]] = []

    def load_dataset(self, *args: Any, **kwargs: Any) -> datasets.IterableDataset:
        self.calls.append((args, kwargs))
        assert kwargs.get("streaming") is True, "Hub datasets must always be streamed"
        return self.splits[kwargs["split"]]

    def split_names(self, name: str, config: str | None = None) -> list[str]:
        return list(self.splits)


def iterable(rows: list[dict]) -> datasets.IterableDataset:
    return datasets.Dataset.from_list(rows).to_iterable_dataset()


@pytest.fixture
def shuffles(monkeypatch: pytest.MonkeyPatch) -> list[dict]:
    """Records the arguments of every IterableDataset.shuffle while still shuffling for real."""
    recorded: list[dict] = []
    original = datasets.IterableDataset.shuffle

    def recording_shuffle(
        self: datasets.IterableDataset, *args: Any, **kwargs: Any
    ) -> datasets.IterableDataset:
        recorded.append(kwargs)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(datasets.IterableDataset, "shuffle", recording_shuffle)
    return recorded


def install(monkeypatch: pytest.MonkeyPatch, hub: FakeHub) -> None:
    monkeypatch.setattr(datasets, "load_dataset", hub.load_dataset)
    monkeypatch.setattr(datasets, "get_dataset_split_names", hub.split_names)


def test_hub_streams_shuffles_and_caps_without_reading_everything(
    monkeypatch: pytest.MonkeyPatch, shuffles: list[dict]
) -> None:
    consumed = 0

    def generate() -> Iterator[dict]:
        nonlocal consumed
        for k in range(50_000):
            consumed += 1
            yield {"question": f"q{k}", "answer": f"step\n#### {k}"}

    hub = FakeHub({"train": datasets.IterableDataset.from_generator(generate)})
    install(monkeypatch, hub)
    loaded = load_data(DataRequest("openai/gsm8k", dataset_config="main"))

    assert hub.calls == [(("openai/gsm8k", "main"), {"split": "train", "streaming": True})]
    assert shuffles == [{"seed": 42, "buffer_size": 10_000}]
    assert len(loaded.train) == 18_000 and len(loaded.eval) == 2_000
    # 20,000 taken plus at most the 10,000-row shuffle buffer: the other ~20,000 rows are never produced.
    assert consumed <= 30_001
    assert loaded.format == "question_answer"
    assert loaded.source == "openai/gsm8k [main] split=train (streamed)"
    assert loaded.eval_source == "10% of training rows (seed 42)"
    first_ids = [int(r["final_answer"]) for r in loaded.train[:50]]
    assert first_ids != sorted(first_ids)  # the shuffle really happened


def test_hub_predefined_test_split_used_for_eval(
    monkeypatch: pytest.MonkeyPatch, shuffles: list[dict]
) -> None:
    train = iterable([{"prompt": f"p{k}", "completion": "c"} for k in range(25_000)])
    test = iterable([{"prompt": f"t{k}", "completion": "c"} for k in range(2_500)])
    hub = FakeHub({"train": train, "validation": iterable([chat()]), "test": test})
    install(monkeypatch, hub)
    loaded = load_data(DataRequest("org/name"))
    assert len(loaded.train) == 20_000  # nothing carved out of train
    assert len(loaded.eval) == 2_000  # 10% of 20,000, and the most
    assert all(r["messages"][0]["content"].startswith("t") for r in loaded.eval)
    assert loaded.eval_source == "test split"
    assert [c[1]["split"] for c in hub.calls] == ["train", "test"]
    assert all(s == {"seed": 42, "buffer_size": 10_000} for s in shuffles) and len(shuffles) == 2


def test_hub_validation_split_when_no_test(monkeypatch: pytest.MonkeyPatch) -> None:
    hub = FakeHub({"train": iterable([chat(k) for k in range(40)]), "validation": iterable([chat(99)] * 3)})
    install(monkeypatch, hub)
    loaded = load_data(DataRequest("org/name"))
    assert (len(loaded.train), len(loaded.eval)) == (40, 3)
    assert loaded.eval_source == "validation split"


def test_hub_split_listing_failure_falls_back_to_carving(monkeypatch: pytest.MonkeyPatch) -> None:
    hub = FakeHub({"train": iterable([chat(k) for k in range(20)])})
    install(monkeypatch, hub)

    def fail(*args: Any, **kwargs: Any) -> list[str]:
        raise ConnectionError("listing unavailable")

    monkeypatch.setattr(datasets, "get_dataset_split_names", fail)
    loaded = load_data(DataRequest("org/name"))
    assert (len(loaded.train), len(loaded.eval)) == (18, 2)


def test_hub_unreachable(monkeypatch: pytest.MonkeyPatch) -> None:
    def offline(*args: Any, **kwargs: Any) -> Any:
        raise ConnectionError("Couldn't reach 'org/name' on the Hub (LocalEntryNotFoundError)\nmore detail")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    assert data_error(lambda: load_data(DataRequest("org/name"))) == (
        "dataset \"org/name\": cannot load from the Hugging Face Hub (Couldn't reach 'org/name' on the Hub "
        "(LocalEntryNotFoundError)); pass a local file or check the name/network"
    )


def test_hub_bad_row_names_dataset_row_and_field(monkeypatch: pytest.MonkeyPatch) -> None:
    rows = [{"instruction": f"i{k}", "output": "o"} for k in range(5)]
    rows[3]["output"] = ""
    install(monkeypatch, FakeHub({"train": iterable(rows)}))
    message = data_error(lambda: load_data(DataRequest("org/name", split="train")))
    assert message.startswith('dataset "org/name" split=train row ')
    assert 'field "output" is empty' in message


def test_hub_eval_dataset_local_file(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    install(
        monkeypatch, FakeHub({"train": iterable([chat(k) for k in range(40)]), "test": iterable([chat()])})
    )
    evals = write_jsonl(tmp_path / "eval.jsonl", [chat(k) for k in range(4)])
    loaded = load_data(DataRequest("org/name", eval_dataset=str(evals)))
    assert (len(loaded.train), len(loaded.eval)) == (40, 4)
    assert loaded.eval_source == str(evals)


# --- train_on_what ----------------------------------------------------------------------------------------


def loaded_with(rows: list[dict], fmt: Any = "messages") -> LoadedData:
    return LoadedData(format=fmt, train=rows, eval=[], source="s", eval_source="e", notes=[])


def test_default_train_on_what() -> None:
    from tinker_cookbook.renderers import TrainOnWhat

    single = chat()
    system = {"messages": [{"role": "system", "content": "s"}, *chat()["messages"]]}
    multi = {"messages": chat(1)["messages"] + chat(2)["messages"]}
    assert default_train_on_what(loaded_with([single, system])) == TrainOnWhat.LAST_ASSISTANT_MESSAGE.value
    assert default_train_on_what(loaded_with([single, multi])) == TrainOnWhat.ALL_ASSISTANT_MESSAGES.value
    assert default_train_on_what(loaded_with([single, multi])) == "all_assistant_messages"
    qa = [{"question": "q", "answer": "a", "final_answer": "a"}]
    assert default_train_on_what(loaded_with(qa, "question_answer")) == "last_assistant_message"


# --- a Hugging Face dataset repository on disk: the real `datasets` code path, no stand-in ---------------


def _chat_rows(n: int, tag: str) -> list[dict]:
    return [
        {
            "messages": [
                {"role": "user", "content": f"{tag} q{i}"},
                {"role": "assistant", "content": f"{tag} a{i}"},
            ]
        }
        for i in range(n)
    ]


@pytest.fixture(scope="module")
def hub_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A dataset laid out as a Hub repository (README configs, split files), as `git clone` of one gives."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    repo = tmp_path_factory.mktemp("hub") / "acme-chats"
    (repo / "data").mkdir(parents=True)
    (repo / "small").mkdir()
    pq.write_table(
        pa.Table.from_pylist(_chat_rows(25_000, "train")), repo / "data" / "train-00000-of-00001.parquet"
    )
    pq.write_table(
        pa.Table.from_pylist(_chat_rows(3_000, "test")), repo / "data" / "test-00000-of-00001.parquet"
    )
    small = [{"question": f"What is {i} + 1?", "answer": f"#### {i + 1}"} for i in range(50)]
    pq.write_table(pa.Table.from_pylist(small), repo / "small" / "train-00000-of-00001.parquet")
    (repo / "README.md").write_text(
        "---\nconfigs:\n- config_name: default\n  data_files:\n  - split: train\n    path: data/train-*\n"
        "  - split: test\n    path: data/test-*\n- config_name: small\n  data_files:\n  - split: train\n"
        "    path: small/train-*\n---\n# acme/chats\n"
    )
    return repo


def test_hub_repository_limits_and_predefined_test_split(hub_repo: Path) -> None:
    loaded = load_data(DataRequest(str(hub_repo)))
    assert loaded.format == "messages"
    assert len(loaded.train) == 20_000  # the cap, streamed: the other 5,000 rows are never read
    assert len(loaded.eval) == 2_000 and loaded.eval_source == "test split"
    assert all(r["messages"][0]["content"].startswith("test ") for r in loaded.eval)
    assert "(streamed)" in loaded.source
    # Shuffled with a buffer (seed 42): not the file's first rows in order.
    assert [r["messages"][0]["content"] for r in loaded.train[:5]] != [f"train q{i}" for i in range(5)]

    small = load_data(DataRequest(str(hub_repo), max_train_rows=500, max_eval_rows=300))
    assert len(small.train) == 500 and len(small.eval) == 50  # the predefined split, 10% of training
    assert small.eval_source == "test split: 50 rows drawn with seed 42 (10% of training)"


def test_hub_repository_config_without_test_split_carves_eval(hub_repo: Path) -> None:
    loaded = load_data(DataRequest(str(hub_repo), dataset_config="small"))
    assert loaded.format == "question_answer"
    assert len(loaded.train) + len(loaded.eval) == 50 and len(loaded.eval) == 5
    assert loaded.train[0]["final_answer"] == str(int(loaded.train[0]["question"].split()[2]) + 1)


def test_hub_repository_unknown_split_is_one_line(hub_repo: Path) -> None:
    message = data_error(lambda: load_data(DataRequest(str(hub_repo), split="nope")))
    assert "acme-chats" in message and "nope" in message


# --- exports from other tools and other surprises ------------------------------------------------------


def test_utf16_export_is_named_as_such(tmp_path: Path) -> None:
    path = tmp_path / "export.jsonl"
    path.write_bytes('{"prompt": "a", "completion": "b"}\n'.encode("utf-16"))
    assert (
        data_error(lambda: load_data(DataRequest(str(path))))
        == f"{path} line 1: the file is UTF-16 encoded; save it as UTF-8"
    )


def test_latin1_byte_names_line_and_fix(tmp_path: Path) -> None:
    path = tmp_path / "latin.jsonl"
    path.write_bytes(b'{"prompt": "a", "completion": "b"}\n{"prompt": "caf\xe9", "completion": "b"}\n')
    message = data_error(lambda: load_data(DataRequest(str(path))))
    assert message.startswith(f"{path} line 2: not valid UTF-8") and "save the file as UTF-8" in message


def test_csv_with_a_repeated_column_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "dup.csv"
    path.write_text("prompt,prompt,completion\na,b,c\nd,e,f\n")
    assert "column 'prompt' appears more than once" in data_error(lambda: load_data(DataRequest(str(path))))


def test_a_single_row_cannot_be_split_into_train_and_eval(tmp_path: Path) -> None:
    path = tmp_path / "one.jsonl"
    path.write_text('{"prompt": "a", "completion": "b"}\n')
    assert "at least 2 are needed" in data_error(lambda: load_data(DataRequest(str(path))))
