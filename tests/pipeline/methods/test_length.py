"""How long a run is when the user does not say (`pipeline.methods.length`): epochs and batch size scaled to the
data for the method's measured minimum of steps, what the user gives kept, the source in summary.json, and the
too-short warning in the plan."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from runs import train_here

from posttrain.pipeline import finish, results
from posttrain.pipeline.methods import METHODS
from posttrain.pipeline.methods.length import MAX_AUTO_EPOCHS, choose_length, resolve, too_short
from posttrain.pipeline.settings import method_config, parse_train_args
from posttrain.pipeline.state import RunState


def _length(task: str, rows: int | None, **given):
    settings = {"batch_size": None, "num_epochs": None, "max_steps": None, **given}
    return choose_length(rows, METHODS[task].steps, **settings)


def test_the_default_sft_run_keeps_one_pass_of_32():
    # README's first command: 360 training rows -> 11 steps of 32, already past SFT's minimum of 10.
    length = _length("sft", 360)
    assert (length.batch_size, length.num_epochs) == (32, 1)
    assert length.batch_size_source == "default" and length.num_epochs_source.startswith(
        "default: one pass is 11"
    )


def test_dpo_on_a_few_hundred_pairs_gets_enough_steps():
    # The case: 216 training pairs ran 6 steps of 32 and moved nothing; now 2 passes of 13 steps of 16.
    length = _length("dpo", 216)
    assert (length.batch_size, length.num_epochs) == (16, 2)
    assert 216 // 16 * 2 >= METHODS["dpo"].steps.minimum
    assert "scaled to the data" in length.batch_size_source and "gallery dpo" in length.num_epochs_source
    assert length.note().startswith(
        "length: num_epochs 2, batch_size 16 (scaled to the data: 2 passes of 13 steps"
    )
    assert _length("sft", 360).note() is None  # the defaults: nothing to say


def test_what_the_user_gives_is_kept():
    assert (_length("dpo", 216, batch_size=32).batch_size, _length("dpo", 216, batch_size=32).num_epochs) == (
        32,
        4,
    )
    explicit = _length("dpo", 216, num_epochs=1)
    assert (
        explicit.num_epochs == 1
        and explicit.num_epochs_source == "explicit"
        and explicit.remedy == "raise num_epochs"
    )
    capped = _length("dpo", 216, max_steps=5)
    assert capped.num_epochs == 1 and capped.remedy == "raise max_steps"
    # Through the settings: num_epochs=1 typed out is the user's, not the rule's default.
    cfg, length = resolve(parse_train_args(["num_epochs=1", "batch_size=32"]), "dpo", _pairs_data(216))
    assert (cfg.num_epochs, cfg.batch_size, length.num_epochs_source, length.batch_size_source) == (
        1,
        32,
        "explicit",
        "explicit",
    )


def test_passes_are_capped_and_rl_keeps_its_batch():
    # A shrunk batch leaves at least 8 steps a pass, so 4 passes reach 32; a batch given may not.
    tiny = _length("prompt_distillation", 40, batch_size=16)  # 2 steps a pass, 32 needed
    assert tiny.num_epochs == MAX_AUTO_EPOCHS and "capped at 4 passes" in tiny.num_epochs_source
    assert "give more rows" in tiny.remedy
    rl = _length("rl", 100)  # RL's batch must keep dividing num_substeps/num_minibatches: only passes scale
    assert (rl.batch_size, rl.num_epochs) == (32, 4)
    generated = _length("rl", None)  # env= problems are generated for max_steps (or 50 steps)
    assert (generated.batch_size, generated.num_epochs) == (32, 1)
    no_rule = _length("rlhf", 100)  # no measured minimum: nothing scaled
    assert (no_rule.batch_size, no_rule.num_epochs) == (32, 1)


def test_the_warning_names_the_setting_to_raise():
    assert too_short("sft", 11, _length("sft", 360)) is None
    warning = too_short("dpo", 5, _length("dpo", 216, max_steps=5))
    assert warning is not None and warning.startswith("warning: task=dpo needs at least 24 optimizer steps")
    assert warning.endswith("this run makes 5: raise max_steps")
    assert too_short("rlhf", 1, None) is None  # no measured minimum, no warning


def test_summary_records_where_epochs_and_batch_size_came_from(tmp_path: Path):
    cfg, length = resolve(method_config(parse_train_args(["task=dpo"]), "dpo"), "dpo", _pairs_data(216))
    state = RunState(cfg, "r", "local", "dpo", results.ResultsDir(tmp_path), length=length)
    record = finish.settings_record(state)
    assert (record["num_epochs"], record["batch_size"]) == (2, 16)
    assert record["num_epochs_source"].startswith("scaled to the data: 2 passes of 13 steps of 16")
    assert record["batch_size_source"].startswith("scaled to the data")


def _pairs_data(n: int):
    from posttrain.pipeline.data import LoadedData

    rows = [
        {"prompt": [{"role": "user", "content": f"{i}"}], "chosen": "a", "rejected": "b"} for i in range(n)
    ]
    return LoadedData("preference", rows, rows[:4], "pairs.jsonl", "given", [])


def _write_pairs(path: Path, n: int = 240) -> Path:
    """The issue's fresh pairs: 'What is a + b?', chosen the sum, rejected a near miss."""
    rows = []
    for i in range(n):
        a, b = i % 17 + 2, i % 13 + 3
        question = f"What is {a} + {b}? Reply with the number only."
        rows.append({"prompt": question, "chosen": str(a + b), "rejected": str(a + b + (1 if i % 2 else -1))})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.parametrize(
    ("args", "steps", "warned"),
    [
        ([], "11 steps of 32 sequences", None),  # the default run: the default data, SFT
        # 216 pairs: 2 passes of 13 of 16 (DPO's own steps: its SFT stage left out)
        (["task=dpo", "dataset={pairs}", "dpo_sft_steps=0"], "26 steps of 32 sequences", None),
        (
            ["task=dpo", "dataset={pairs}", "dpo_sft_steps=0", "num_epochs=1", "batch_size=32"],
            "6 steps of 64 sequences",
            "raise num_epochs",
        ),
    ],
)
def test_the_plan_warns_before_a_run_too_short_to_learn(
    tmp_path: Path, engine, tiny_model: str, args, steps, warned
):
    pairs = _write_pairs(tmp_path / "pairs.jsonl")
    common = [
        f"model_name={tiny_model}",
        "renderer_name=role_colon",
        f"base_url={engine.url}",
        "dry_run=true",
    ]
    proc = train_here([a.format(pairs=pairs) for a in args] + common, tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    plan = [line for line in proc.stdout.splitlines() if line.startswith("plan: ")]
    assert any(line.startswith(f"plan: {steps}") for line in plan), plan
    warnings = [line for line in plan if line.startswith("plan: warning: ")]
    if warned is None:
        assert warnings == [], warnings
    else:
        assert len(warnings) == 1 and warnings[0].endswith(warned), warnings
