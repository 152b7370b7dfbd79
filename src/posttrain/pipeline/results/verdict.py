"""Is the trained model better beyond noise? The paired difference on the held-out examples, its 95% interval, a
test, and one of three verdicts.

Every held-out example is scored for both models, so the comparison is paired: each example's `delta` (positive
= better; `compare_examples` makes them) is what the models differ by on it.

- Right/wrong scores (accuracy, preference accuracy, wins): the exact McNemar test on the examples that flipped
  (b improved, c regressed; two-sided binomial test of b out of b + c at 1/2), and the exact conditional interval
  that goes with it: the Clopper-Pearson interval of b / (b + c), mapped to the difference in accuracy
  (b + c) / n * (2 pi - 1). The interval excludes zero exactly when the test rejects at 5%, so the two never
  disagree (4 improved, 0 regressed of 16: p = 0.125, interval -5 .. +25 points: inconclusive).
- Graded scores (NLL per example, a fraction of tests, a judged score, a game's 1/0.5/0): the paired bootstrap's
  BCa interval of the mean difference (10,000 resamples, fixed seed, so the same rows give the same interval),
  and the paired sign-flip permutation test's p-value (exact up to 13 examples, else 10,000 draws).

The verdict reads the interval: `improved` when it lies above zero, `not improved` when the point estimate is no
better or the interval lies below zero, `inconclusive` otherwise, with the number of held-out examples that
would make the observed effect distinguishable (80% power at 5%, from the observed spread of the differences).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from typing import Any, Literal

Verdict = Literal["improved", "not improved", "inconclusive"]
VERDICTS: tuple[Verdict, ...] = ("improved", "not improved", "inconclusive")
CONFIDENCE = 0.95
RESAMPLES = 10_000
SEED = 0  # the same rows give the same interval and p-value
# z for a two-sided 5% test and for 80% power: the examples needed to tell an effect of the observed size.
Z_ALPHA, Z_POWER = 1.959964, 0.841621
# Below this many paired examples a graded score's bootstrap says nothing useful.
MIN_GRADED_EXAMPLES = 5


def paired_verdict(deltas: Sequence[float], binary: bool) -> dict[str, Any]:
    """The difference (mean of `deltas`), its interval, the test and the verdict for paired per-example deltas.

    `binary`: every delta is -1, 0 or 1 (a right/wrong score), so the exact McNemar test applies.
    """
    n = len(deltas)
    mean = sum(deltas) / n if n else 0.0
    if binary:
        improved, regressed = sum(d > 0 for d in deltas), sum(d < 0 for d in deltas)
        low, high, p, test = _mcnemar(improved, regressed, n)
    else:
        improved, regressed = None, None
        low, high, p, test = _bootstrap(deltas)
    verdict = decide(mean, low, high)
    return {
        "verdict": verdict,
        "n": n,
        "difference": mean,
        "interval": [low, high],
        "confidence": CONFIDENCE,
        "test": test,
        "p_value": p,
        **({"flipped_better": improved, "flipped_worse": regressed} if binary else {}),
        "examples_needed": examples_needed(deltas) if verdict == "inconclusive" else None,
    }


def decide(mean: float, low: float, high: float) -> Verdict:
    if math.isinf(low) and math.isinf(high):  # no examples to speak of: no evidence either way
        return "inconclusive"
    if mean <= 0 or high < 0:
        return "not improved"
    return "improved" if low > 0 else "inconclusive"


def examples_needed(deltas: Sequence[float]) -> int | None:
    """Held-out examples for 80% power at 5% given the observed mean and spread of the deltas (None: no effect)."""
    n = len(deltas)
    mean = sum(deltas) / n if n else 0.0
    if n < 2 or mean <= 0:
        return None
    sd = math.sqrt(sum((d - mean) ** 2 for d in deltas) / (n - 1))
    return max(n + 1, math.ceil(((Z_ALPHA + Z_POWER) * sd / mean) ** 2))


def _mcnemar(improved: int, regressed: int, n: int) -> tuple[float, float, float, str]:
    from scipy.stats import binomtest

    flipped = improved + regressed
    if n == 0:
        return -math.inf, math.inf, 1.0, "mcnemar_exact"
    if flipped == 0:
        # No example changed. The difference is at most the share of examples that change, which here is known
        # only to lie below its exact 95% bound (0 of n: 1 - 0.025^(1/n)); a point interval would overstate what
        # n examples tell (10 unchanged examples leave +-31 points open).
        bound = 1 - ((1 - CONFIDENCE) / 2) ** (1 / n)
        return -bound, bound, 1.0, "mcnemar_exact"
    result = binomtest(improved, flipped, 0.5)
    ci = result.proportion_ci(CONFIDENCE, method="exact")
    share = flipped / n
    return share * (2 * ci.low - 1), share * (2 * ci.high - 1), float(result.pvalue), "mcnemar_exact"


def _bootstrap(deltas: Sequence[float]) -> tuple[float, float, float, str]:
    import numpy as np
    from scipy.stats import bootstrap, permutation_test

    x = np.asarray(deltas, dtype=float)
    mean = float(x.mean()) if len(x) else 0.0
    if len(x) < MIN_GRADED_EXAMPLES or float(x.max()) == float(x.min()):
        # Too few examples, or no spread at all (every example moved alike): no interval to speak of.
        wide = math.inf if len(x) < MIN_GRADED_EXAMPLES else 0.0
        p = 1.0 if len(x) < MIN_GRADED_EXAMPLES or mean == 0 else 0.0
        return mean - wide, mean + wide, p, "paired_bootstrap"
    rng = np.random.default_rng(SEED)
    # BCa on heavily tied data warns of degenerate resamples; the interval stands
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ci = bootstrap(
            (x,), np.mean, confidence_level=CONFIDENCE, n_resamples=RESAMPLES, method="BCa", rng=rng
        )
    low, high = float(ci.confidence_interval.low), float(ci.confidence_interval.high)
    if not (math.isfinite(low) and math.isfinite(high)):
        ci = bootstrap(
            (x,), np.mean, confidence_level=CONFIDENCE, n_resamples=RESAMPLES, method="percentile", rng=rng
        )
        low, high = float(ci.confidence_interval.low), float(ci.confidence_interval.high)
    # Paired sign-flip test: under "no difference" each example's delta is as likely negated.
    test = permutation_test(
        (x,), np.mean, permutation_type="samples", n_resamples=RESAMPLES, alternative="two-sided", rng=rng
    )
    return low, high, float(test.pvalue), "paired_bootstrap"


def verdict_text(v: dict[str, Any], unit: str, scale: float = 1.0) -> str:
    """'+20.0 points (95% interval +6.0 to +34.0; McNemar exact p = 0.021; n = 50): improved'."""
    low, high = v["interval"]
    test = "McNemar exact" if v["test"] == "mcnemar_exact" else "paired permutation"
    interval = (
        f"{low * scale:+.{_digits(unit)}f} to {high * scale:+.{_digits(unit)}f}"
        if math.isfinite(low) and math.isfinite(high)
        else "too few examples"
    )
    text = (
        f"{v['difference'] * scale:+.{_digits(unit)}f} {unit} (95% interval {interval}; {test} "
        f"p {_p(v['p_value'])}; n = {v['n']}): {v['verdict']}"
    )
    if v.get("examples_needed"):
        text += f" (about {v['examples_needed']} held-out examples would tell an effect this size)"
    return text


def interval_bounds(improvement: Mapping[str, Any]) -> str | None:
    """'[+2.8, +29.4]': summary.json's `improvement` interval in its unit (points: x100), or None when it is
    unbounded (too few examples; JSON has no infinity, so it reads back as null)."""
    interval, unit = improvement.get("interval"), str(improvement.get("unit") or "")
    if not (isinstance(interval, list | tuple) and len(interval) == 2):
        return None
    if not all(isinstance(x, int | float) and math.isfinite(x) for x in interval):
        return None
    scale, digits = (100.0 if unit == "points" else 1.0), _digits(unit)
    return f"[{interval[0] * scale:+.{digits}f}, {interval[1] * scale:+.{digits}f}]"


def _digits(unit: str) -> int:
    return 1 if unit == "points" else 3


def _p(p: float) -> str:
    return "< 0.001" if p < 0.001 else f"= {p:.3f}"
