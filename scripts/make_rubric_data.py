"""Regenerate src/posttrain/data/rubric_example.jsonl, the example data set for task=rubric.

    uv run python scripts/make_rubric_data.py [OUT]

Short questions, each with two rubric items that are easy to judge from the reply alone (starts with Yes or
No, mentions a word, is one sentence, is a list, is short), so that even a small grader has a chance and the
default model (SmolLM2-135M-Instruct), which tends to answer at length, has room to improve. Built from fixed
word lists with a fixed seed: the same file every time.
"""

import json
import random
import sys
from pathlib import Path

SEED = 20261124
N_ROWS = 400

ANIMALS = ["dog", "cat", "horse", "cow", "lion", "tiger", "rabbit", "eagle", "shark", "frog", "sheep", "bear"]
FRUITS = ["apple", "banana", "orange", "grape", "pear", "cherry", "lemon", "mango", "peach", "plum"]
COLOURS = ["red", "blue", "green", "yellow", "purple", "orange", "black", "white"]
COUNTRIES = {
    "France": "Paris",
    "Japan": "Tokyo",
    "Italy": "Rome",
    "Spain": "Madrid",
    "Egypt": "Cairo",
    "Canada": "Ottawa",
    "Germany": "Berlin",
    "Kenya": "Nairobi",
    "Peru": "Lima",
    "Norway": "Oslo",
}
TOPICS = ["the sun", "the ocean", "rain", "trees", "the moon", "snow", "music", "bread", "bicycles", "rivers"]
KINDS = {"animal": ANIMALS, "fruit": FRUITS, "colour": COLOURS}


def yes_no(rng: random.Random) -> dict:
    kind = rng.choice(list(KINDS))
    other = rng.choice([k for k in KINDS if k != kind])
    thing = rng.choice(KINDS[kind] if rng.random() < 0.5 else KINDS[other])
    return {
        "messages": [{"role": "user", "content": f"Is {thing} a {kind}?"}],
        "rubric": [
            'The reply starts with the word "Yes" or the word "No".',
            "The reply is at most two sentences long.",
        ],
    }


def capital(rng: random.Random) -> dict:
    country = rng.choice(list(COUNTRIES))
    return {
        "messages": [{"role": "user", "content": f"What is the capital of {country}?"}],
        "rubric": [
            {"criterion": f"The reply names {COUNTRIES[country]}.", "weight": 2},
            "The reply is one short sentence.",
        ],
    }


def name_one(rng: random.Random) -> dict:
    kind = rng.choice(list(KINDS))
    return {
        "messages": [{"role": "user", "content": f"Name one {kind}."}],
        "rubric": [f"The reply names a {kind}.", "The reply is one short sentence."],
    }


def list_three(rng: random.Random) -> dict:
    kind = rng.choice(list(KINDS))
    return {
        "messages": [{"role": "user", "content": f"List three {kind}s."}],
        "rubric": [
            "The reply is a list with one item per line.",
            f"The reply names three {kind}s and nothing else.",
        ],
    }


def one_sentence(rng: random.Random) -> dict:
    topic = rng.choice(TOPICS)
    return {
        "messages": [{"role": "user", "content": f"Say something about {topic}."}],
        "rubric": [f"The reply mentions {topic}.", "The reply is a single sentence."],
    }


MAKERS = [yes_no, capital, name_one, list_three, one_sentence]


def main(out: Path) -> None:
    rng = random.Random(SEED)
    rows = [MAKERS[i % len(MAKERS)](rng) for i in range(N_ROWS)]
    rng.shuffle(rows)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    print(f"wrote {len(rows)} rubric rows to {out}")


if __name__ == "__main__":
    default = Path(__file__).resolve().parent.parent / "src" / "posttrain" / "data" / "rubric_example.jsonl"
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else default)
