"""What else separates a data set's chosen answers from its rejected ones, besides being better.

DPO learns whatever tells chosen from rejected. When a form does (a marker the rejected answers carry far more
often, or a length), the model learns the form, and its own answers can get worse while preference accuracy
rises: the gallery's sampled arithmetic pairs had `####` in 28% of rejected answers and 5% of chosen ones, and
DPO on them taught the model to drop the answer format (greedy task accuracy 88% -> 56%). These checks find such
a form and say so before training; they do not change the data.
"""

from __future__ import annotations

from collections.abc import Sequence

# A word counts as a form marker when the share of answers containing it differs by this much between sides.
MARKER_GAP = 0.2
# Lengths differ materially when the mean of one side is this much longer than the other's.
LENGTH_RATIO = 1.3
MIN_PAIRS = 20  # fewer pairs say nothing reliable about a form


def form_confounds(rows: Sequence[dict]) -> list[str]:
    """One line per form that separates chosen from rejected in `rows` (normalized preference rows)."""
    if len(rows) < MIN_PAIRS:
        return []
    chosen = [_text(r["chosen"]) for r in rows]
    rejected = [_text(r["rejected"]) for r in rows]
    notes = [_marker_note(word, c, r) for word, c, r in _marker_gaps(chosen, rejected)]
    c_len, r_len = sum(map(len, chosen)) / len(chosen), sum(map(len, rejected)) / len(rejected)
    if max(c_len, r_len) > LENGTH_RATIO * max(1.0, min(c_len, r_len)):
        longer = "chosen" if c_len > r_len else "rejected"
        notes.append(
            f"the {longer} answers are longer ({c_len:.0f} vs {r_len:.0f} characters on average): DPO may learn "
            "length rather than quality"
        )
    return notes


def _marker_gaps(chosen: list[str], rejected: list[str]) -> list[tuple[str, float, float]]:
    """(word, share of chosen answers with it, share of rejected ones) for the 3 widest gaps over MARKER_GAP."""
    words = {w for text in chosen + rejected for w in set(text.split()) if not w.isalnum() or len(w) > 3}
    shares = []
    for word in words:
        c = sum(word in text.split() for text in chosen) / len(chosen)
        r = sum(word in text.split() for text in rejected) / len(rejected)
        if abs(c - r) >= MARKER_GAP:
            shares.append((word, c, r))
    return sorted(shares, key=lambda s: -abs(s[1] - s[2]))[:3]


def _marker_note(word: str, chosen: float, rejected: float) -> str:
    more, less = ("rejected", "chosen") if rejected > chosen else ("chosen", "rejected")
    return (
        f"{word!r} appears in {max(chosen, rejected):.0%} of {more} answers and {min(chosen, rejected):.0%} of "
        f"{less} ones: DPO may learn to {'avoid' if more == 'rejected' else 'write'} it rather than what makes "
        "an answer better"
    )


def _text(value: object) -> str:
    if isinstance(value, list):  # a conversation: its messages' text
        return " ".join(str(m.get("content", "")) for m in value if isinstance(m, dict))
    return str(value)
