"""A small `verifiers` environment to try `env=verifiers:` without the Environments Hub: spell a word backwards.

`uv run python train.py env=verifiers:src/posttrain/data/reverse_word_env.py` loads it by module path, exactly as
an environment package installed with `prime env install` is loaded by name. The idea is the Hub's
`primeintellect/reverse-text` (reverse the text, answer inside tags, scored by similarity to the reversed text),
shrunk to single made-up words so that a 135M model can move on it. The answer is the text inside
`<reversed>...</reversed>` when the reply has the tags, else the whole reply; its score is the similarity of its
letters to the word reversed (difflib's ratio, 1.0 when exact), so a reply that is close earns part of the reward
and a chatty one little.
"""

from __future__ import annotations

import difflib
import random
import re

import verifiers as vf
from datasets import Dataset

SYSTEM_PROMPT = (
    "Spell the given word backwards, letter by letter. Reply with the reversed word inside tags, like this: "
    "<reversed>tac</reversed> for the word cat."
)
_TAGGED = re.compile(r"<reversed>(.*?)</reversed>", re.DOTALL)
_LETTERS = "abcdefghijklmnopqrstuvwxyz"


def _words(count: int, seed: int, lengths: tuple[int, int]) -> list[str]:
    """Made-up lower-case words: no model has memorised their reversals."""
    rng = random.Random(seed)
    return ["".join(rng.choice(_LETTERS) for _ in range(rng.randint(*lengths))) for _ in range(count)]


def _rows(words: list[str]) -> Dataset:
    return Dataset.from_list([{"question": f"Word: {word}", "answer": word[::-1]} for word in words])


def _answer(completion: list[dict]) -> str:
    reply = completion[-1]["content"]
    found = _TAGGED.search(reply)
    return "".join(c for c in (found.group(1) if found else reply).lower() if c.isalpha())


def reversed_answer(completion: list[dict], answer: str) -> float:
    """Similarity of the answer's letters to the reversed word."""
    return difflib.SequenceMatcher(None, _answer(completion), answer).ratio()


def exact(completion: list[dict], answer: str) -> float:
    return float(_answer(completion) == answer)


def load_environment(
    num_train: int = 512, num_eval: int = 50, min_len: int = 3, max_len: int = 5
) -> vf.Environment:
    """Training words and held-out words come from different seeds; `exact` is reported, not rewarded."""
    rubric = vf.Rubric(funcs=[reversed_answer, exact], weights=[1.0, 0.0])
    return vf.SingleTurnEnv(
        dataset=_rows(_words(num_train, seed=0, lengths=(min_len, max_len))),
        eval_dataset=_rows(_words(num_eval, seed=1, lengths=(min_len, max_len))),
        system_prompt=SYSTEM_PROMPT,
        rubric=rubric,
    )
