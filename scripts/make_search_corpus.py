"""Make the corpus that `env=tools:search` searches: short passages about fictional towns, inventors, ships,
companies and festivals, with questions whose answer is in exactly one passage.

The entities are invented (names built from syllables), so a model cannot know the answers without searching.
Every name is unique in the corpus, so a question names its passage's entity and nothing else does. A fixed
fifth of the passages (chosen by seed 0) is held out: their questions are only ever used for evaluation, so
a trained model cannot have memorised their answers.

    uv run python scripts/make_search_corpus.py            # writes src/posttrain/data/search_corpus.jsonl
    uv run python scripts/make_search_corpus.py --as-user-files DIR

The second writes the same corpus as a user's files for `env=tools:search corpus= dataset= eval_dataset=`:
DIR/docs.jsonl (id, text), DIR/qa.jsonl (the training passages' questions), DIR/qa_eval.jsonl (the held-out ones').

Rows: {"id", "text", "split": "train"|"test", "questions": [{"question", "answer"}, ...]}.
The same command always writes the same file (a test checks the shipped file against it).
"""

from __future__ import annotations

import argparse
import json
import random
from collections.abc import Callable
from pathlib import Path

OUT = Path(__file__).resolve().parent.parent / "src" / "posttrain" / "data" / "search_corpus.jsonl"
PER_KIND = 60  # x 5 kinds = 300 passages
HELD_OUT_FRACTION = 0.2

_ONSETS = [
    "b",
    "br",
    "d",
    "dr",
    "f",
    "g",
    "gr",
    "k",
    "kr",
    "l",
    "m",
    "n",
    "p",
    "qu",
    "r",
    "s",
    "st",
    "t",
    "th",
    "v",
    "w",
    "z",
]
_VOWELS = ["a", "e", "i", "o", "u", "ai", "ei", "ou"]
_CODAS = ["", "", "", "l", "n", "r", "s", "th", "nd", "rk", "st", "m"]
_COLOURS = ["red", "blue", "green", "yellow", "black", "white", "grey", "orange", "purple", "brown"]
_PRODUCTS = [
    "blue salt",
    "glass bells",
    "river pearls",
    "copper kettles",
    "honey wine",
    "wool blankets",
    "clay pipes",
    "silver thread",
    "smoked eels",
    "paper lanterns",
    "oak barrels",
    "rose soap",
    "iron nails",
    "goat cheese",
    "linen sails",
    "amber beads",
]
_DEVICES = [
    "steam loom",
    "wind clock",
    "water pump",
    "rope bridge",
    "glass lens",
    "brass compass",
    "signal lamp",
    "printing drum",
    "sea anchor",
    "music box",
    "spring lock",
    "snow plough",
]
_REGIONS = ["northern", "southern", "eastern", "western", "upper", "lower"]
_CARGO = ["grain", "timber", "coal", "salt", "tea", "cotton", "wine", "spices", "marble", "wool"]
_SEASONS = ["spring", "summer", "autumn", "winter"]
_FOODS = ["plum cake", "fish soup", "roast chestnuts", "barley bread", "apple pie", "lamb stew"]


class Names:
    """Unique invented names: syllables from a seeded generator; a name already used is drawn again."""

    def __init__(self, rng: random.Random):
        self.rng = rng
        self.used: set[str] = set()

    def word(self, syllables: tuple[int, int] = (2, 3)) -> str:
        while True:
            n = self.rng.randint(*syllables)
            parts = [self.rng.choice(_ONSETS) + self.rng.choice(_VOWELS) for _ in range(n)]
            name = ("".join(parts) + self.rng.choice(_CODAS)).capitalize()
            if name not in self.used and len(name) >= 4:
                self.used.add(name)
                return name

    def person(self) -> str:
        return f"{self.word((1, 2))} {self.word((2, 3))}"


def _town(names: Names, rng: random.Random) -> tuple[str, list[tuple[str, str]]]:
    town, founder, year = names.word(), names.person(), str(rng.randint(1100, 1899))
    product, region = rng.choice(_PRODUCTS), rng.choice(_REGIONS)
    text = (
        f"{town} is a town in the {region} hills. It was founded in {year} by {founder}. "
        f"The town is known for its {product}."
    )
    return text, [
        (f"Who founded the town of {town}?", founder),
        (f"In which year was the town of {town} founded?", year),
        (f"What is the town of {town} known for?", product),
    ]


def _inventor(names: Names, rng: random.Random) -> tuple[str, list[tuple[str, str]]]:
    person, home, year = names.person(), names.word(), str(rng.randint(1500, 1950))
    device = rng.choice(_DEVICES)
    text = f"{person} was an inventor from {home}. In {year}, {person} built the first {device}."
    return text, [
        (f"What did the inventor {person} build?", device),
        (f"Where was the inventor {person} from?", home),
        (f"In which year did {person} build the first {device}?", year),
    ]


def _ship(names: Names, rng: random.Random) -> tuple[str, list[tuple[str, str]]]:
    ship, captain, colour = names.word(), names.person(), rng.choice(_COLOURS)
    cargo, port = rng.choice(_CARGO), names.word()
    text = (
        f"The {ship} is a {colour} cargo ship. Her captain is {captain}, and she carries {cargo} to {port}."
    )
    return text, [
        (f"Who is the captain of the ship {ship}?", captain),
        (f"What colour is the ship {ship}?", colour),
        (f"To which port does the ship {ship} carry {cargo}?", port),
    ]


def _company(names: Names, rng: random.Random) -> tuple[str, list[tuple[str, str]]]:
    company, owner, year = f"{names.word()} Works", names.person(), str(rng.randint(1800, 2020))
    product, office = rng.choice(_PRODUCTS), names.word()
    text = (
        f"{company} is a company that makes {product}. {owner} started it in {year}, in the town of {office}."
    )
    return text, [
        (f"Who started {company}?", owner),
        (f"What does {company} make?", product),
        (f"In which town was {company} started?", office),
    ]


def _festival(names: Names, rng: random.Random) -> tuple[str, list[tuple[str, str]]]:
    festival, town, season = f"{names.word()} Festival", names.word(), rng.choice(_SEASONS)
    food, days = rng.choice(_FOODS), str(rng.randint(2, 9))
    text = f"The {festival} is held every {season} in {town}. It lasts {days} days, and people eat {food}."
    return text, [
        (f"Where is the {festival} held?", town),
        (f"In which season is the {festival} held?", season),
        (f"What do people eat at the {festival}?", food),
    ]


KINDS: list[Callable[[Names, random.Random], tuple[str, list[tuple[str, str]]]]] = [
    _town,
    _inventor,
    _ship,
    _company,
    _festival,
]


def make_corpus(seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    names = Names(rng)
    passages = []
    for kind in KINDS:
        for _ in range(PER_KIND):
            text, questions = kind(names, rng)
            passages.append({"text": text, "questions": [{"question": q, "answer": a} for q, a in questions]})
    rng.shuffle(passages)
    held_out = set(rng.sample(range(len(passages)), int(len(passages) * HELD_OUT_FRACTION)))
    return [
        {
            "id": f"p{i:03d}",
            "text": p["text"],
            "split": "test" if i in held_out else "train",
            "questions": p["questions"],
        }
        for i, p in enumerate(passages)
    ]


def user_files(rows: list[dict]) -> dict[str, list[dict]]:
    """The corpus as a user brings one: the passages, and question/answer rows split as the shipped corpus is."""
    questions = {
        split: [
            {"question": q["question"], "answer": q["answer"]}
            for r in rows
            if r["split"] == split
            for q in r["questions"]
        ]
        for split in ("train", "test")
    }
    return {
        "docs.jsonl": [{"id": r["id"], "text": r["text"]} for r in rows],
        "qa.jsonl": questions["train"],
        "qa_eval.jsonl": questions["test"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument(
        "--as-user-files", type=Path, metavar="DIR", help="write docs.jsonl, qa.jsonl, qa_eval.jsonl"
    )
    args = parser.parse_args()
    rows = make_corpus()
    if args.as_user_files is not None:
        args.as_user_files.mkdir(parents=True, exist_ok=True)
        for name, lines in user_files(rows).items():
            _write(args.as_user_files / name, lines)
            print(f"{args.as_user_files / name}: {len(lines)} rows")
        return
    _write(args.out, rows)
    print(f"{args.out}: {len(rows)} passages, {sum(len(r['questions']) for r in rows)} questions")


def _write(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


if __name__ == "__main__":
    main()
