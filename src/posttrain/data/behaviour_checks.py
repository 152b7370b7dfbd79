"""Behaviour checks for `task=prompt_distillation behaviour_check=src/posttrain/data/behaviour_checks.py:NAME`.

Each gets the held-out prompt row ({"messages": [...]}) and one greedy answer and says whether the answer shows
the behaviour the system prompt asks for. Plain stdlib, so they run in the verifier's worker processes.
"""

from __future__ import annotations

import re

# Frequent French function words that are rare in English text: a cheap language identifier that is right on
# whole answers, which is all a behaviour rate needs.
FRENCH_WORDS = frozenset(
    "le la les de des du un une est et en que qui pour dans sur avec pas ce cette sont au aux il elle nous "
    "vous je".split()
)


def in_french(row: dict, answer: str) -> bool:
    words = re.findall(r"[a-zàâçéèêëîïôûùüÿœ']+", answer.lower())
    return len(words) >= 3 and sum(w in FRENCH_WORDS for w in words) / len(words) > 0.15


def one_sentence(row: dict, answer: str) -> bool:
    sentences = [s for s in re.split(r"(?<=[.!?])\s+", answer.strip()) if s]
    return len(sentences) == 1
