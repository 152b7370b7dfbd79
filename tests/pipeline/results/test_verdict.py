"""The verdict: the paired difference, its 95% interval and test, and improved / not improved / inconclusive."""

from __future__ import annotations

import random

import pytest

from posttrain.cli.main import verdict_exit_code
from posttrain.pipeline.results import compare_examples
from posttrain.pipeline.results.rows import PreferenceExample, RLExample, SFTExample
from posttrain.pipeline.results.summary import judge_improvement
from posttrain.pipeline.results.verdict import paired_verdict


def rl_pairs(improved: int, regressed: int, both_right: int, both_wrong: int) -> tuple[list, list]:
    flips = [(False, True)] * improved + [(True, False)] * regressed
    flips += [(True, True)] * both_right + [(False, False)] * both_wrong
    base = [RLExample(i, "q", "1", "", "", b) for i, (b, _) in enumerate(flips)]
    trained = [RLExample(i, "q", "1", "", "", t) for i, (_, t) in enumerate(flips)]
    return base, trained


def verdict_of(base: list, trained: list, kind: str = "score") -> dict:
    return judge_improvement(kind, compare_examples(base, trained, kind))  # type: ignore[arg-type]


def test_one_more_right_answer_of_50_is_inconclusive():
    v = verdict_of(*rl_pairs(1, 0, 20, 29))
    assert v["verdict"] == "inconclusive" and v["test"] == "mcnemar_exact"
    assert v["difference"] == pytest.approx(0.02) and v["p_value"] == pytest.approx(1.0)
    low, high = v["interval"]
    assert low < 0 < high and v["examples_needed"] > 50
    assert "inconclusive" in v["text"] and "n = 50" in v["text"]


def test_dpo_four_of_sixteen_pairs_is_not_called_improved():
    """The gallery's DPO case: 4 pairs improved, 0 regressed, of 16 (exact McNemar p = 0.125)."""
    base = [PreferenceExample(i, "p", "c", "r", -1.0, -0.5, -0.5, i >= 4) for i in range(16)]
    trained = [PreferenceExample(i, "p", "c", "r", -0.5, -1.0, 0.5, True) for i in range(16)]
    v = verdict_of(base, trained)
    assert v["verdict"] == "inconclusive" and v["p_value"] == pytest.approx(0.125)
    assert v["interval"][0] < 0 and v["interval"][1] == pytest.approx(0.25)


def test_math_rl_13_improved_3_regressed_of_50_is_improved():
    v = verdict_of(*rl_pairs(13, 3, 15, 19))
    assert v["verdict"] == "improved" and v["p_value"] == pytest.approx(0.0213, abs=1e-3)
    assert 0 < v["interval"][0] < 0.2 < v["interval"][1] and v["examples_needed"] is None


def test_fewer_right_answers_is_not_improved():
    clear = verdict_of(*rl_pairs(1, 12, 10, 27))
    assert clear["verdict"] == "not improved" and clear["interval"][1] < 0
    # Worse by a little (the interval spans zero): still not improved, since the point estimate is no better.
    slight = verdict_of(*rl_pairs(2, 3, 10, 35))
    assert slight["verdict"] == "not improved" and slight["interval"][0] < 0 < slight["interval"][1]


def test_no_example_changing_leaves_the_difference_open_by_what_n_examples_tell():
    """10 answers, none changed (the 2026-12-06 RL sweep's test rows): not a point interval at zero."""
    v = verdict_of(*rl_pairs(0, 0, 9, 1))
    assert v["verdict"] == "not improved" and v["difference"] == 0 and v["p_value"] == 1
    assert v["interval"] == pytest.approx([-0.3085, 0.3085], abs=1e-4)  # 1 - 0.025 ** (1 / 10)
    wide, narrow = verdict_of(*rl_pairs(0, 0, 5, 5)), verdict_of(*rl_pairs(0, 0, 100, 100))
    assert narrow["interval"][1] < wide["interval"][1] < 1


def test_binary_interval_excludes_zero_exactly_when_mcnemar_rejects():
    for improved in range(25):
        for regressed in range(25):
            if improved + regressed == 0:
                continue
            v = paired_verdict([1] * improved + [-1] * regressed + [0] * 10, binary=True)
            assert (v["interval"][0] > 0) == (v["p_value"] < 0.05 and improved > regressed), (
                improved,
                regressed,
            )


def nll_pairs(gains: list[float]) -> tuple[list, list]:
    base = [SFTExample(i, "p", "c", 2.0) for i in range(len(gains))]
    return base, [SFTExample(i, "p", "c", 2.0 - g) for i, g in enumerate(gains)]


def test_nll_clear_gain_is_improved_and_noise_is_inconclusive():
    rng = random.Random(0)
    clear = verdict_of(*nll_pairs([0.8 + rng.gauss(0, 0.2) for _ in range(40)]), "nll")
    assert clear["verdict"] == "improved" and clear["test"] == "paired_bootstrap" and clear["p_value"] < 0.001
    assert 0.6 < clear["interval"][0] < clear["difference"] < clear["interval"][1] < 1.0
    noise = verdict_of(*nll_pairs([0.02 + rng.gauss(0, 0.3) for _ in range(40)]), "nll")
    assert noise["verdict"] == "inconclusive" and noise["interval"][0] < 0 < noise["interval"][1]
    assert noise["p_value"] > 0.05 and noise["examples_needed"] > 40
    worse = verdict_of(*nll_pairs([-0.5 + rng.gauss(0, 0.1) for _ in range(40)]), "nll")
    assert worse["verdict"] == "not improved"


def test_partial_credit_uses_the_bootstrap_on_rewards():
    base, trained = rl_pairs(0, 0, 0, 12)
    for i, (b, t) in enumerate(zip(base, trained, strict=True)):
        b.reward, t.reward = 0.25, 0.25 + (0.5 if i % 3 else 0.0)
    v = verdict_of(base, trained)
    assert v["test"] == "paired_bootstrap" and v["verdict"] == "improved"
    assert v["difference"] == pytest.approx(0.5 * 8 / 12)


def test_same_rows_give_the_same_interval():
    rng = random.Random(1)
    gains = [0.1 + rng.gauss(0, 0.3) for _ in range(30)]
    assert paired_verdict(gains, binary=False) == paired_verdict(gains, binary=False)


def test_no_paired_examples_is_inconclusive():
    v = verdict_of([], [])
    assert v["verdict"] == "inconclusive" and v["n"] == 0


@pytest.mark.parametrize(
    "summary, code",
    [
        ({"verdict": "improved"}, 0),
        ({"verdict": "not improved"}, 1),
        ({"verdict": "inconclusive"}, 3),
        ({"verdict": "improved", "guard": {"regressed": ["general chat NLL"]}}, 4),
        ({"verdict": "improved", "guard": {"regressed": []}}, 0),
        ({"verdict": "inconclusive", "guard": {"regressed": ["general chat NLL"]}}, 3),
    ],
)
def test_exit_code_follows_the_verdict(summary, code):
    assert verdict_exit_code(summary) == code
