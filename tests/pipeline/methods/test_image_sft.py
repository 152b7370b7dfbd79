"""task=sft on image rows (the cookbook's vlm_classifier recipe): the rows rendered by the vision stand-in's real
renderer and image processor, and the refusals before anything starts on the local backend (text-only models,
unreadable image, missing label), each one line with exit code 2 and nothing written. The Tinker path, the plan
and training are in tests/pipeline/test_vision_e2e.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image
from runs import train_here

from posttrain.pipeline.data import images

VL_MODEL = "Qwen/Qwen3-VL-30B-A3B-Instruct"
CLASSES = ["blue", "red"]


def write_images(folder: Path, n: int = 8) -> Path:
    """n solid red and n solid blue 32x32 PNGs, and data.jsonl naming them relative to itself."""
    (folder / "pics").mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        for colour, rgb in (("red", (230, 20, 20)), ("blue", (20, 20, 230))):
            Image.new("RGB", (32, 32), rgb).save(folder / "pics" / f"{colour}{i}.png")
            rows.append({"image": f"pics/{colour}{i}.png", "label": colour})
    data = folder / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return data


@pytest.fixture
def vl_hub(vision_hub_cache: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The stand-in's tokenizer and image processor found offline in this process: huggingface_hub reads
    HF_HUB_CACHE once at import, so its constant is set too."""
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_CACHE", str(vision_hub_cache))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(vision_hub_cache))
    return vision_hub_cache


@pytest.fixture
def vl_renderer(vl_hub: Path):
    from posttrain.pipeline.data.image_dataset import image_renderer

    return image_renderer(VL_MODEL, "qwen3_vl_instruct")


def test_a_row_is_the_image_chunk_the_question_and_the_answer(vl_renderer, tmp_path: Path) -> None:
    import tinker
    from tinker_cookbook.image_processing_utils import get_image_processor
    from tinker_cookbook.renderers import TrainOnWhat

    from posttrain.pipeline.data.image_dataset import image_datum
    from posttrain.pipeline.evaluation.images import classification_prompt

    Image.new("RGB", (600, 300), (20, 20, 230)).save(tmp_path / "wide.png")
    image = images.load_image(str(tmp_path / "wide.png"))
    assert image.size == (480, 240)
    processor = get_image_processor(VL_MODEL)
    expected = processor.get_number_of_image_patches(240, 480, images_kwargs={}) // processor.merge_size**2
    datum = image_datum(vl_renderer, image, "blue", CLASSES, 2048, TrainOnWhat.LAST_ASSISTANT_MESSAGE)
    chunks = datum.model_input.chunks
    pictures = [c for c in chunks if isinstance(c, tinker.types.ImageChunk)]
    assert len(pictures) == 1 and pictures[0].format == "jpeg" and pictures[0].expected_tokens == expected
    tokenizer = vl_renderer.tokenizer
    text = [tokenizer.decode(c.tokens) for c in chunks if isinstance(c, tinker.types.EncodedTextChunk)]
    assert text[1] == "<|vision_start|>" and text[2].startswith("<|vision_end|>" + images.question(CLASSES))
    targets = datum.loss_fn_inputs["target_tokens"].to_numpy()
    weights = datum.loss_fn_inputs["weights"].to_numpy()
    trained = tokenizer.decode([int(t) for t, w in zip(targets, weights, strict=True) if w > 0])
    assert trained == "The subject in this photo is: blue\n<|im_end|>"  # only the answer is trained on

    prompt = classification_prompt(vl_renderer, image, CLASSES)
    assert prompt.length == datum.model_input.length - len(tokenizer.encode(" blue\n<|im_end|>")) + 1
    assert tokenizer.decode(prompt.chunks[-1].tokens) == images.ANSWER_PREFIX  # the recipe's prefill


def one_line_refusal(proc) -> str:
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    return lines[0]


@pytest.mark.parametrize("model", ["HuggingFaceTB/SmolLM2-135M-Instruct", "Qwen/Qwen3-8B"])
def test_a_text_only_model_is_refused_before_anything_starts(tmp_path: Path, model: str) -> None:
    data = write_images(tmp_path, n=2)
    proc = train_here([f"dataset={data}", f"model_name={model}", "backend=local"], tmp_path)
    line = one_line_refusal(proc)
    assert line.startswith(f"error: {data}: image rows need a vision-language model; {model} is text-only"), (
        line
    )
    if model.startswith("Hugging"):  # outside the lineup: the models that do take images are named
        assert f"(vision-language models: {VL_MODEL}, " in line
    assert not (tmp_path / "results").exists()


@pytest.mark.parametrize(
    ("bad_row", "expected"),
    [
        (
            {"image": "pics/broken.png", "label": "red"},
            'line 5: field "image": {pics}/broken.png cannot be read as an image',
        ),
        ({"image": "pics/red0.png"}, 'line 5: field "label" is missing'),
    ],
)
def test_bad_rows_stop_the_run_in_one_line(tmp_path: Path, bad_row: dict, expected: str) -> None:
    data = write_images(tmp_path, n=2)
    (tmp_path / "pics" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    with data.open("a") as handle:
        handle.write(json.dumps(bad_row) + "\n")
    proc = train_here([f"dataset={data}", f"model_name={VL_MODEL}", "backend=local"], tmp_path)
    line = one_line_refusal(proc)
    assert line.startswith(f"error: {data} " + expected.format(pics=tmp_path / "pics")), line
    assert not (tmp_path / "results").exists()


def test_an_image_that_cannot_be_fetched_fails_its_example_or_stops_training_in_one_line(
    vl_renderer, vision_engine, services, tmp_path: Path
) -> None:
    """Evaluation: the unfetchable image is that example's error (counted as wrong), the others are answered.
    Training: the batch that holds it stops the run with one line naming the URL."""
    import asyncio

    from posttrain.errors import DataError
    from posttrain.pipeline.data.image_dataset import ImageRowsBuilder
    from posttrain.pipeline.evaluation.common import SamplingSettings
    from posttrain.pipeline.evaluation.images import evaluate_classification
    from posttrain.pipeline.results import validate_rows

    Image.new("RGB", (32, 32), (230, 20, 20)).save(tmp_path / "red.png")
    unreachable = "http://127.0.0.1:9/blue.png"  # a closed port: the fetch is refused at once
    rows = [{"image": str(tmp_path / "red.png"), "label": "red"}, {"image": unreachable, "label": "blue"}]
    service = services(base_url=vision_engine.url, api_key="tml-local-test")
    client = service.create_sampling_client(base_model=VL_MODEL).result()
    settings = SamplingSettings(max_tokens=4, temperature=0.0, seed=0, concurrency=2)
    records, accuracy = asyncio.run(
        evaluate_classification(client, rows, CLASSES, vl_renderer, settings, "base")
    )
    validate_rows(records, "score", "rl")
    assert records[0].error is None and records[0].question == str(tmp_path / "red.png")
    assert (
        records[1].error == f"DataError: image {unreachable}: cannot be fetched "
        "(URLError: <urlopen error [Errno 111] Connection refused>)"
    )
    assert records[1].correct is None and accuracy == float(records[0].correct) / 2

    train_file = tmp_path / "train.jsonl"
    train_file.write_text("".join(json.dumps(r) + "\n" for r in rows))
    builder = ImageRowsBuilder(
        model_name=VL_MODEL,
        renderer_name="qwen3_vl_instruct",
        train_file=str(train_file),
        classes=tuple(CLASSES),
        batch_size=2,
        max_length=512,
    )
    train, held_out = builder()
    assert held_out is None and len(train) == 1
    with pytest.raises(DataError) as info:
        train.get_batch(0)
    assert str(info.value).startswith(f"image {unreachable}: cannot be fetched (")
