"""Preference pairs whose chosen and rejected answers differ in form (a marker, a length) are flagged before DPO."""

from __future__ import annotations

import json
from pathlib import Path

from posttrain.gallery.examples import PAIRS_FILE, _write_pairs
from posttrain.pipeline.data.pair_checks import form_confounds
from posttrain.util import PACKAGE_DATA


def rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_the_sampled_arithmetic_pairs_are_flagged_for_their_answer_marker():
    notes = form_confounds(rows(PACKAGE_DATA / "preference_arithmetic_hardest.jsonl"))
    assert notes == [
        "'####' appears in 28% of rejected answers and 5% of chosen ones: DPO may learn to avoid it rather than "
        "what makes an answer better"
    ]


def test_length_is_flagged_and_form_matched_pairs_are_not(tmp_path: Path):
    wordy = [{"chosen": "The answer, worked out step by step, is 4.", "rejected": "5"} for _ in range(30)]
    assert any("chosen answers are longer" in n for n in form_confounds(wordy))
    assert form_confounds(wordy[:5]) == []  # too few pairs to say
    _write_pairs(tmp_path, n=200)  # the gallery's DPO pairs: right vs a near miss in one shared form
    generated = rows(tmp_path / PAIRS_FILE)
    assert len(generated) == 200 and form_confounds(generated) == []
    assert all(r["chosen"] != r["rejected"] and r["answer"] in r["chosen"] for r in generated)
