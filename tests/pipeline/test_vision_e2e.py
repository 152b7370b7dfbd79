"""The image path end to end on the Tinker path, without the cloud: `train.py backend=tinker base_url=<local engine>`
on the tiny Qwen3-VL stand-in served as Qwen/Qwen3-VL-30B-A3B-Instruct, trained as an image classifier on solid
red and blue squares written by the test (the cookbook's vlm_classifier recipe's shapes).

data (image rows) -> the recommended renderer with the model's image processor -> image chunks on the wire -> the
engine (training, logprobs, sampling) -> accuracy of greedy answers on held-out images, base and trained alike ->
a complete results folder. Bad inputs stop the same command in one line before anything is spent.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image
from runs import FINISHED, Finished, read_jsonl, start_with_keys_file, wait_all

from posttrain.pipeline.results import validate_rows, validate_summary

VL_MODEL = "Qwen/Qwen3-VL-30B-A3B-Instruct"
ENV_FILE = "TINKER_API_KEY=tml-vision-test\nWANDB_API_KEY=fake-key-vision-987\nWANDB_PROJECT=posttrain-vision-tests\n"
COLOURS = {"red": (230, 20, 20), "blue": (20, 20, 230)}
# Five steps of 4 images per pass, three passes, at a rate that moves a 64-wide random model in that many steps
# (0.02 does it in 10 but spikes in some runs: the cookbook's loop gives no seed, so each run's LoRA starts anew).
TRAIN_ARGS = [
    "batch_size=4",
    "num_epochs=3",
    "learning_rate=0.005",
    "lora_rank=8",
    "save_every=0",
    "eval_every=5",
]


def write_images(folder: Path, per_colour: int, prefix: str) -> Path:
    """Solid squares of each colour (sizes vary, so images take different token counts) and their data file."""
    (folder / "pics").mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(per_colour):
        for colour, rgb in COLOURS.items():
            name = f"pics/{prefix}-{colour}{i}.png"
            Image.new("RGB", (32 + 8 * i, 32), rgb).save(folder / name)
            rows.append({"image": name, "label": colour})
    data = folder / f"{prefix}.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return data


@pytest.fixture(scope="module")
def vision_runs(
    tmp_path_factory: pytest.TempPathFactory, vision_engine, vision_hub_cache: Path
) -> dict[str, Finished]:
    """Every run of this module at once (most of a run's time is imports: they overlap), then their outcomes."""
    root = tmp_path_factory.mktemp("vision-runs")
    # 20 training images; 2 held out, one of each colour (a given eval set is capped at 10% of training rows).
    train = write_images(root / "run", 10, "train")
    held_out = write_images(root / "run", 1, "eval")
    model = f"model_name={VL_MODEL}"
    bad_image, no_label = root / "bad" / "bad.jsonl", root / "bad" / "nolabel.jsonl"
    write_images(root / "bad", 2, "rows")
    (root / "bad" / "pics" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n cut short")
    rows = (root / "bad" / "rows.jsonl").read_text()
    bad_image.write_text(rows + json.dumps({"image": "pics/broken.png", "label": "red"}) + "\n")
    no_label.write_text(rows + json.dumps({"image": "pics/rows-red0.png"}) + "\n")
    planned = {
        "train": [model, f"dataset={train}", f"eval_dataset={held_out}", "run_name=vision", *TRAIN_ARGS],
        "plan": [model, f"dataset={train}", "dry_run=true", "batch_size=4", "max_steps=3", "eval_every=0"],
        "bad_image": [model, f"dataset={bad_image}"],
        "no_label": [model, f"dataset={no_label}"],
        "text_only": ["model_name=HuggingFaceTB/SmolLM2-135M-Instruct", f"dataset={train}"],
        "local": [
            model,
            f"dataset={train}",
            f"eval_dataset={held_out}",
            "run_name=local",
            "max_steps=2",
            "batch_size=4",
            "lora_rank=4",
            "save_every=0",
            "eval_every=0",
        ],
    }
    started = {}
    for key, args in planned.items():
        # backend=local: the run starts its own engine, which finds the stand-in in the hub cache by its name.
        backend = ["backend=local"] if key == "local" else ["backend=tinker", f"base_url={vision_engine.url}"]
        started[key] = (
            root / key,
            start_with_keys_file([*backend, *args], root / key, ENV_FILE, vision_hub_cache),
        )
    return wait_all(started, timeout=900)


def test_an_image_classifier_trains_and_is_evaluated_end_to_end(vision_runs: dict[str, Finished]) -> None:
    proc = vision_runs["train"]
    output = proc.stdout + proc.stderr
    # Exit 1 when the accuracy did not improve: ten steps do not make a random 64-wide model a classifier.
    assert proc.returncode in FINISHED and "Traceback" not in output, output[-6000:]
    assert "task: sft (image data)" in proc.stdout
    assert "renderer: qwen3_vl_instruct (cookbook recommendation)" in proc.stdout
    assert "classes: 2 (blue, red)" in proc.stdout

    results = proc.cwd / "results"
    summary = json.loads((results / "summary.json").read_text())
    validate_summary(summary)
    assert summary["status"] == "completed" and summary["method"] == "sft" and summary["model"] == VL_MODEL
    assert summary["backend"] == "tinker" and summary["renderer"]["name"] == "qwen3_vl_instruct"
    # The headline metric is the held-out accuracy, and summary.json says what it measures.
    assert summary["score_label"] == "accuracy" and summary["improvement"]["metric"] == "accuracy"
    assert "greedy answer" in summary["accuracy_definition"]
    assert summary["headline"].startswith("Base accuracy: ")
    assert summary["dataset"]["format"] == "image" and summary["dataset"]["classes"] == ["blue", "red"]
    assert summary["sizes"] == {"train_rows": 20, "eval_rows": 2, "classes": 2}

    base, trained = read_jsonl(results / "base_model.jsonl"), read_jsonl(results / "trained_model.jsonl")
    validate_rows(base, "score", "rl")
    validate_rows(trained, "score", "rl")
    assert [r["question"] for r in base] == [r["question"] for r in trained]  # the same images, in order
    pictures = proc.cwd.parent / "run" / "pics"  # where the held-out images were written
    for row in base + trained:
        assert "error" not in row, row
        assert Path(row["question"]).is_file() and row["question"].startswith(str(pictures / "eval-"))
        assert row["ground_truth"] in COLOURS
        assert row["correct"] == (row["extracted_answer"] == row["ground_truth"])
    for side, rows in (("baseline_score", base), ("trained_score", trained)):
        assert summary[side] == sum(r["correct"] for r in rows) / len(rows)

    log_dir = results / "logs" / "vision"
    metrics = read_jsonl(log_dir / "metrics.jsonl")
    nll = [m["train_mean_nll"] for m in metrics if "train_mean_nll" in m]
    assert len(nll) == 15 and max(nll[-3:]) < 0.75 * nll[0]  # forward_backward on image chunks trains
    # the cookbook's NLL on the held-out images
    held_out_nll = [m["test/nll"] for m in metrics if "test/nll" in m]
    assert len(held_out_nll) >= 3 and held_out_nll[-1] < 0.75 * held_out_nll[0]
    # Images never go into rows, the summary or the logs as bytes: only their paths. (report.html embeds its
    # charts as PNGs, so it is left out.)
    for f in results.rglob("*"):
        if f.is_file() and f.suffix in (".json", ".jsonl", ".log", ".md", ".txt"):
            text = f.read_bytes()
            assert b"iVBORw0KGgo" not in text and b"/9j/4" not in text, f  # base64 PNG / JPEG


def test_the_local_engine_serves_the_vision_model(vision_runs: dict[str, Finished]) -> None:
    proc = vision_runs["local"]
    output = proc.stdout + proc.stderr
    # 1: two steps did not improve
    assert proc.returncode in FINISHED and "Traceback" not in output, output[-6000:]
    assert f"engine: starting the local engine with {VL_MODEL}" in proc.stdout
    results = proc.cwd / "results"
    summary = json.loads((results / "summary.json").read_text())
    validate_summary(summary)
    assert summary["backend"] == "local" and summary["score_label"] == "accuracy"
    trained = read_jsonl(results / "trained_model.jsonl")
    validate_rows(trained, "score", "rl")
    assert len(trained) == 2 and not [r for r in trained if "error" in r]


def test_the_plan_counts_each_images_tokens(vision_runs: dict[str, Finished]) -> None:
    proc = vision_runs["plan"]
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    assert (
        "plan: image tokens as the model's image processor counts them (each image resized to at most 480 px "
        "on its longest side)" in lines
    )
    mean = next(line for line in lines if line.startswith("plan: 3 steps of 4 sequences (mean "))
    # Each image is scaled up to the processor's minimum of 65,536 pixels: 64 image tokens for a 32x32 square, up to
    # 75 for the 104x32 one; the question, the answer and the chat markup add 39 tokens.
    assert 103 < float(mean.split("(mean ")[1].split()[0]) < 114, mean
    assert not (proc.cwd / "results").exists()


@pytest.mark.parametrize(
    ("key", "expected"),
    [
        (
            "bad_image",
            'bad.jsonl line 5: field "image": {folder}/pics/broken.png cannot be read as an image (',
        ),
        ("no_label", 'nolabel.jsonl line 5: field "label" is missing (the class name)'),
        (
            "text_only",
            "train.jsonl: image rows need a vision-language model; HuggingFaceTB/SmolLM2-135M-Instruct "
            "is text-only (vision-language models: Qwen/Qwen3-VL-30B-A3B-Instruct, ",
        ),
    ],
)
def test_bad_inputs_stop_in_one_line_before_anything_is_spent(
    vision_runs: dict[str, Finished], key: str, expected: str
) -> None:
    proc = vision_runs[key]
    assert proc.returncode == 2, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    folder = proc.cwd.parent / "bad"
    assert expected.format(folder=folder) in lines[0], lines[0]
    # Stopped while the data was checked: no session, no renderer, no results folder.
    assert not [line for line in proc.stdout.splitlines() if line.startswith(("renderer:", "run:", "plan:"))]
    assert not (proc.cwd / "results").exists()
