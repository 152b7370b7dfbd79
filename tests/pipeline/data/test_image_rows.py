"""Image classification rows (the cookbook's vlm_classifier recipe's shapes): detection, paths relative to the data
file, the checks before anything starts (each one line naming file:line and the field or path), URLs left for later
(and one line when their fetch fails), and the recipe's prompt, answer and parsing pinned against the recipe."""

from __future__ import annotations

import csv
import http.server
import inspect
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from PIL import Image
from runs import data_error, write_jsonl

from posttrain.errors import DataError
from posttrain.pipeline.data import images
from posttrain.pipeline.data.formats import detect_format
from posttrain.pipeline.data.load import DataRequest, load_data


@pytest.fixture
def pictures(tmp_path: Path) -> Path:
    """Four red PNGs and four blue JPEGs under tmp_path/pics."""
    folder = tmp_path / "pics"
    folder.mkdir()
    for i in range(4):
        Image.new("RGB", (24, 24), (255, 0, 0)).save(folder / f"red{i}.png")
        Image.new("RGB", (24, 24), (0, 0, 255)).save(folder / f"blue{i}.jpg")
    return folder


def rows_for(folder: str) -> list[dict]:
    return [{"image": f"{folder}/red{i}.png", "label": "red"} for i in range(4)] + [
        {"image": f"{folder}/blue{i}.jpg", "label": "Blue_Sky"} for i in range(4)
    ]


def test_image_rows_load_with_paths_relative_to_the_data_file(
    tmp_path: Path, pictures: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = write_jsonl(tmp_path / "data.jsonl", rows_for("pics"))
    monkeypatch.chdir(pictures)  # the run starts elsewhere: paths still resolve from the data file's folder
    loaded = load_data(
        DataRequest(str(data), eval_dataset=str(write_jsonl(tmp_path / "e.jsonl", rows_for("pics"))))
    )
    assert loaded.format == "image"
    assert {r["image"] for r in loaded.train} == {str(pictures / p.name) for p in pictures.iterdir()}
    assert {r["label"] for r in loaded.train} == {"red", "Blue_Sky"}
    assert set(loaded.train[0]) == {"image", "label"}


def test_absolute_paths_file_urls_and_csv(tmp_path: Path, pictures: Path) -> None:
    rows = [
        {"image": str(pictures / "red0.png"), "label": "red"},
        {"image": (pictures / "blue0.jpg").as_uri(), "label": "blue"},
    ]
    loaded = load_data(DataRequest(str(write_jsonl(tmp_path / "abs.jsonl", rows * 2))))
    assert {r["image"] for r in [*loaded.train, *loaded.eval]} == {
        str(pictures / "red0.png"),
        str(pictures / "blue0.jpg"),
    }

    with (tmp_path / "data.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, ["image", "label"])
        writer.writeheader()
        writer.writerows(rows_for("pics"))
    assert load_data(DataRequest(str(tmp_path / "data.csv"))).format == "image"


def test_urls_are_not_fetched_when_rows_are_checked(tmp_path: Path, pictures: Path) -> None:
    rows = [
        {"image": "https://images.invalid/cat.png", "label": "cat"},
        {"image": "pics/red0.png", "label": "red"},
    ]
    loaded = load_data(DataRequest(str(write_jsonl(tmp_path / "urls.jsonl", rows))))
    assert "https://images.invalid/cat.png" in {r["image"] for r in [*loaded.train, *loaded.eval]}


@pytest.mark.parametrize(
    ("bad_row", "expected"),
    [
        ({"image": "pics/red0.png"}, 'line 3: field "label" is missing'),
        ({"image": "pics/red0.png", "label": "  "}, 'line 3: field "label" is empty'),
        ({"image": "", "label": "red"}, 'line 3: field "image" is empty'),
        (
            {"image": ["pics/red0.png"], "label": "red"},
            'line 3: field "image" must be a string (a path or URL), got list',
        ),
        (
            {"image": "pics/red0.png", "label": "a: b"},
            """line 3: field "label" is 'a: b'; a class name cannot contain ":\"""",
        ),
        (
            {"image": "s3://bucket/x.png", "label": "red"},
            "line 3: field \"image\" is 's3://bucket/x.png'; expected a file path",
        ),
        ({"label": "red"}, 'line 3: field "image" is missing; '),
    ],
)
def test_bad_rows_are_one_line_naming_file_line_and_field(
    tmp_path: Path, pictures: Path, bad_row: dict, expected: str
) -> None:
    data = write_jsonl(tmp_path / "data.jsonl", [*rows_for("pics")[:2], bad_row, *rows_for("pics")[2:]])
    message = data_error(lambda: load_data(DataRequest(str(data))))
    assert message.startswith(f"{data} {expected}"), message


def test_missing_and_undecodable_images_name_the_path(tmp_path: Path, pictures: Path) -> None:
    missing = write_jsonl(
        tmp_path / "missing.jsonl", [*rows_for("pics"), {"image": "pics/nope.png", "label": "red"}]
    )
    assert data_error(lambda: load_data(DataRequest(str(missing)))) == (
        f'{missing} line 9: field "image": {pictures / "nope.png"} does not exist'
    )
    (pictures / "text.png").write_text("not an image")
    whole = (pictures / "blue0.jpg").read_bytes()
    # a truncated download: opens, does not decode
    (pictures / "cut.jpg").write_bytes(whole[: len(whole) // 2])
    for name in ("text.png", "cut.jpg"):
        data = write_jsonl(
            tmp_path / "bad.jsonl", [{"image": f"pics/{name}", "label": "red"}, *rows_for("pics")]
        )
        message = data_error(lambda data=data: load_data(DataRequest(str(data))))
        assert message.startswith(
            f'{data} line 1: field "image": {pictures / name} cannot be read as an image ('
        ), message


def test_detection_needs_only_the_image_field() -> None:
    assert detect_format({"image": "a.png", "label": "x"}, "w") == "image"
    assert detect_format({"image": "a.png"}, "w") == "image"  # the label's absence is then reported by name
    # Rows of other formats that also carry an image keep their format.
    assert detect_format({"messages": [], "image": "a.png"}, "w") == "messages"


# --- the recipe's words --------------------------------------------------------------------------------------


def test_prompt_answer_and_parsing_are_the_recipes() -> None:
    from tinker_cookbook.recipes.vlm_classifier import data as recipe_data
    from tinker_cookbook.recipes.vlm_classifier import eval as recipe_eval

    train_source = inspect.getsource(recipe_data.ClassifierDataset.build_supervised_example)
    assert f'text="{images.QUESTION}"' in train_source
    assert 'f"The subject in this photo is: {class_label_name}\\n"' in train_source
    assert images.answer("Blue_Sky") == f"{images.ANSWER_PREFIX} blue sky\n"
    assert f'prefill="{images.ANSWER_PREFIX}"' in inspect.getsource(
        recipe_eval.ClassifierEvaluator.build_generation_prompt
    )
    assert 'split(":")[-1].strip().lower()' in inspect.getsource(
        recipe_eval.ClassifierEvaluator.generate_output
    )
    assert "max_image_size: int = 480" in inspect.getsource(recipe_data.ClassifierDatasetConfig)
    for label in ("Golden_Retriever", "st.bernard", "a-b c"):
        assert images.class_name(label) == recipe_data.ClassifierDataset.get_class_name(None, label)  # type: ignore[arg-type]
    assert images.predicted_class(" Golden Retriever\n") == "golden retriever"
    assert images.predicted_class("The subject in this photo is: Red") == "red"
    assert images.class_names([{"label": "b_x"}, {"label": "a"}, {"label": "B-X"}]) == ["a", "b x"]
    assert images.question(["a", "b x"]) == f"{images.QUESTION} Answer with one of: a, b x."


# --- images when they are used ---------------------------------------------------------------------------------


@pytest.fixture
def served(pictures: Path) -> Iterator[str]:
    """An HTTP server on loopback serving the pictures folder; yields its base URL."""

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, directory=str(pictures), **kwargs)

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Quiet)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_load_image_resizes_converts_and_fetches(tmp_path: Path, pictures: Path, served: str) -> None:
    Image.new("RGBA", (960, 240), (0, 255, 0, 128)).save(tmp_path / "wide.png")
    wide = images.load_image(str(tmp_path / "wide.png"))
    assert wide.size == (480, 120) and wide.mode == "RGB"  # the recipe's max_image_size, JPEG-ready
    assert images.load_image(f"{served}/red1.png").getpixel((0, 0)) == (255, 0, 0)
    with pytest.raises(DataError) as info:
        images.load_image(f"{served}/absent.png")
    assert (
        str(info.value)
        == f"image {served}/absent.png: cannot be fetched (HTTPError: HTTP Error 404: File not found)"
    )
    with pytest.raises(DataError) as unreadable:
        images.load_image(str(tmp_path / "gone.png"))
    assert str(unreadable.value).startswith(
        f"image {tmp_path / 'gone.png'}: cannot be read (FileNotFoundError"
    )
