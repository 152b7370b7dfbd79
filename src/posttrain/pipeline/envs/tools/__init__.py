"""Multi-turn tool use (`env=tools:calculator`, `env=tools:search`): the problems, the tools' own logic, options.

The env, the cookbook tools and the reward are in `tool_envs` (they import the cookbook; this module runs in
the checks before a run and imports nothing heavy).

- calculator: generated multi-step arithmetic word problems (held-out problems from another seed); the tool
  evaluates arithmetic with `safe_eval`, an `ast` whitelist (numbers, + - * / // % ** and parentheses; nothing
  is ever executed).
- search: a shipped corpus of 300 short passages about invented entities (`data/search_corpus.jsonl`, made by
  `scripts/make_search_corpus.py`), searched with BM25 (`bm25s`, in memory: the cookbook's search recipe needs a
  vector database and an embedding service); questions on a fixed fifth of the passages are held out for
  evaluation, so no evaluation answer is ever trained on.

Options: `env=tools:NAME:max_turns=N` (default 4): turns per episode, each a tool call or the final answer.
"""

from __future__ import annotations

import ast
import json
import math
import operator
import random
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

from posttrain.config import TOOL_ENVS
from posttrain.errors import ConfigError
from posttrain.pipeline.envs.registry import ProblemSet
from posttrain.util import PACKAGE_DATA

DEFAULT_MAX_TURNS = 4
MAX_TURNS_LIMIT = 20
CORPUS_FILE = PACKAGE_DATA / "search_corpus.jsonl"
SEARCH_RESULTS = 2
# Renderers of tinker-cookbook 0.6.1 whose `create_conversation_prefix_with_tools` raises NotImplementedError
# (a test pins this list to the cookbook); checked before the engine starts. Others registered at run time are
# checked when the run is prepared.
NO_TOOL_CALL_RENDERERS = ("llama3", "role_colon")

# ---------------------------------------------------------------------------------------------- options


@dataclass(frozen=True)
class ToolEnvSpec:
    name: str
    max_turns: int = DEFAULT_MAX_TURNS


def parse_spec(spec: str) -> ToolEnvSpec:
    """`NAME` or `NAME:max_turns=N` (the part after `env=tools:`)."""
    name, _, options = spec.partition(":")
    name = name.strip()
    if name not in TOOL_ENVS:
        raise ConfigError(f"env=tools:{name}: no such tool environment; available: {', '.join(TOOL_ENVS)}")
    max_turns = DEFAULT_MAX_TURNS
    for item in filter(None, (o.strip() for o in options.split(","))):
        key, sep, value = (s.strip() for s in item.partition("="))
        if key != "max_turns" or not sep:
            raise ConfigError(f"env=tools:{spec}: unknown option {item!r}; the only option is max_turns=N")
        if not value.isdigit() or not 1 <= int(value) <= MAX_TURNS_LIMIT:
            raise ConfigError(
                f"env=tools:{spec}: max_turns={value!r} is not valid; expected 1 to {MAX_TURNS_LIMIT}"
            )
        max_turns = int(value)
    return ToolEnvSpec(name, max_turns)


def check_renderer(renderer_name: str, spec: str) -> None:
    if renderer_name in NO_TOOL_CALL_RENDERERS:
        raise ConfigError(
            f"env=tools:{spec} needs a renderer with a tool-call format; renderer {renderer_name!r} has none "
            "(set renderer_name, e.g. qwen3_instruct for ChatML models)"
        )


# ------------------------------------------------------------------------------------- safe calculator


class CalculatorError(ValueError):
    """An expression the calculator does not evaluate (not arithmetic, too big, division by zero)."""


_BINARY: dict[type, Callable[[Any, Any], Any]] = {
    ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow,
}  # fmt: skip
_UNARY: dict[type, Callable[[Any], Any]] = {ast.UAdd: operator.pos, ast.USub: operator.neg}
MAX_EXPRESSION_CHARS = 200
# Bounds that keep every result small: no exponent can build a number of millions of digits.
MAX_EXPONENT = 64
MAX_MAGNITUDE = 10**30


def safe_eval(expression: str) -> int | float:
    """The value of an arithmetic expression; anything else (names, calls, attributes, strings...) is refused.

    Only the `ast` nodes of numbers and the operators above are walked: nothing is ever executed."""
    text = expression.strip()
    if len(text) > MAX_EXPRESSION_CHARS:
        raise CalculatorError(f"expression longer than {MAX_EXPRESSION_CHARS} characters")
    try:
        tree = ast.parse(text, mode="eval")
    except (SyntaxError, ValueError):
        raise CalculatorError(f"not an arithmetic expression: {text!r}") from None
    return _evaluate(tree.body)


def _evaluate(node: ast.AST) -> int | float:
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):  # bool is not int here
        return node.value
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        return _UNARY[type(node.op)](_evaluate(node.operand))
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        left, right = _evaluate(node.left), _evaluate(node.right)
        if isinstance(node.op, ast.Pow) and abs(right) > MAX_EXPONENT:
            raise CalculatorError(f"exponent larger than {MAX_EXPONENT}")
        try:
            value = _BINARY[type(node.op)](left, right)
        except (ZeroDivisionError, OverflowError) as exc:
            raise CalculatorError(str(exc)) from None
        if not isinstance(value, int | float) or (isinstance(value, float) and not math.isfinite(value)):
            raise CalculatorError("the result is not a real number")
        if abs(value) > MAX_MAGNITUDE:
            raise CalculatorError("the result is too large")
        return value
    raise CalculatorError(
        f"only numbers, + - * / // % ** and parentheses are allowed, not {type(node).__name__}"
    )


def format_number(value: int | float) -> str:
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(round(value, 6)) if isinstance(value, float) else str(value)


# --------------------------------------------------------------------------------- calculator problems

# Word problems from random numbers: each needs two or three operations on two-digit numbers, which a small
# model gets wrong by heart and right with the tool. Each returns (question, answer).


def _pencils(r: random.Random) -> tuple[str, int]:
    a, b, c = r.randint(12, 99), r.randint(12, 99), r.randint(10, 140)
    return (
        f"A shop has {a} boxes with {b} pencils in each box. It sells {c} pencils. How many pencils are left?",
        a * b - c,
    )


def _change(r: random.Random) -> tuple[str, int]:
    a, b = r.randint(3, 29), r.randint(12, 49)
    c = a * b + r.randint(1, 300)
    return (
        f"Mia buys {a} tickets at {b} dollars each and pays with {c} dollars. How much change does she get?",
        c - a * b,
    )


def _train(r: random.Random) -> tuple[str, int]:
    a, b, c = r.randint(21, 99), r.randint(3, 19), r.randint(11, 199)
    return (
        f"A train travels {a} km each hour for {b} hours, then {c} km more. How far does it travel in total?",
        a * b + c,
    )


def _legs(r: random.Random) -> tuple[str, int]:
    a, b = r.randint(13, 99), r.randint(13, 99)
    return f"A farm has {a} cows and {b} chickens. How many legs do the animals have in total?", 4 * a + 2 * b


def _bags(r: random.Random) -> tuple[str, int]:
    c = r.randint(3, 12)
    a, b = c * r.randint(2, 9), r.randint(12, 48)
    return (
        f"A baker makes {a} trays of {b} cookies and packs them in bags of {c}. How many bags does he fill?",
        a * b // c,
    )


def _savings(r: random.Random) -> tuple[str, int]:
    a, b, c = r.randint(12, 99), r.randint(12, 52), r.randint(10, 140)
    return (
        f"Sam saves {a} dollars every week for {b} weeks, then spends {c} dollars. How much does he have left?",
        a * b - c,
    )


def _books(r: random.Random) -> tuple[str, int]:
    a, b, c = r.randint(12, 99), r.randint(12, 99), r.randint(11, 299)
    return (
        f"A library has {a} shelves with {b} books on each shelf. {c} new books arrive. How many books does it have now?",
        a * b + c,
    )


def _crayons(r: random.Random) -> tuple[str, int]:
    a, b, c = r.randint(12, 99), r.randint(12, 64), r.randint(11, 99)
    return (
        f"A school orders {a} boxes of {b} crayons and {c} single crayons. How many crayons is that in all?",
        a * b + c,
    )


_WORD_PROBLEMS = (_pencils, _change, _train, _legs, _bags, _savings, _books, _crayons)


def calculator_problems(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        question, answer = rng.choice(_WORD_PROBLEMS)(rng)
        out.append({"question": question, "answer": str(answer), "grader": "math", "tool_env": "calculator"})
    return out


# --------------------------------------------------------------------------------------- search corpus


@cache
def load_corpus(path: Path = CORPUS_FILE) -> tuple[dict, ...]:
    return tuple(json.loads(line) for line in path.read_text().splitlines() if line.strip())


def search_problems(split: str, n: int, seed: int) -> list[dict]:
    """`n` questions on the passages of `split` ("train" or "test"), drawn by `seed` (with repeats if more
    are asked for than there are)."""
    pool = [
        {
            "question": q["question"],
            "answer": q["answer"],
            "grader": "text",
            "tool_env": "search",
            "passage_id": p["id"],
        }  # fmt: skip
        for p in load_corpus()
        if p["split"] == split
        for q in p["questions"]
    ]
    rng = random.Random(seed)
    if n <= len(pool):
        return rng.sample(pool, n)
    return [rng.choice(pool) for _ in range(n)]


class Retriever:
    """BM25 over the corpus passages (`bm25s`, in memory; 300 passages index in milliseconds)."""

    def __init__(self, passages: tuple[dict, ...] | list[dict]):
        import bm25s

        self.passages = list(passages)
        self._bm25 = bm25s.BM25()
        self._bm25.index(self._tokenize([p["text"] for p in self.passages]), show_progress=False)

    @staticmethod
    def _tokenize(texts: list[str]) -> Any:
        import bm25s

        return bm25s.tokenize(texts, stopwords="en", show_progress=False)

    def search(self, query: str, k: int = SEARCH_RESULTS) -> list[dict]:
        """The best `k` passages with a positive score (none when no query word is in the corpus)."""
        tokens = self._tokenize([query])
        if not tokens.ids or not tokens.ids[0]:
            return []
        # Query words the index has never seen carry no weight; with none left there is nothing to rank.
        known = [w for w in tokens.vocab if w in self._bm25.vocab_dict]
        if not known:
            return []
        docs, scores = self._bm25.retrieve([known], k=min(k, len(self.passages)), show_progress=False)
        return [self.passages[int(d)] for d, s in zip(docs[0], scores[0], strict=True) if s > 0]


@cache
def corpus_retriever() -> Retriever:
    return Retriever(load_corpus())


# ----------------------------------------------------------------------------------------- problem sets


def tool_problems(spec: str, n_train: int, n_eval: int, seed: int, eval_seed: int) -> ProblemSet:
    parsed = parse_spec(spec)
    if parsed.name == "calculator":
        train, held_out = calculator_problems(n_train, seed), calculator_problems(n_eval, eval_seed)
        info = {
            "source": f"generated multi-step arithmetic word problems (seeds {seed} / {eval_seed})",
            "tool": "calculator: arithmetic expressions, evaluated by an ast whitelist",
        }
    else:
        corpus = load_corpus()
        n_test_questions = sum(len(p["questions"]) for p in corpus if p["split"] == "test")
        train = search_problems("train", n_train, seed)
        held_out = search_problems("test", min(n_eval, n_test_questions), eval_seed)
        info = {
            "source": f"questions on the shipped corpus {CORPUS_FILE.name} ({len(corpus)} passages about "
            "invented entities), training passages only",
            "eval_source": f"{len(held_out)} questions on the held-out passages (never trained on), seed {eval_seed}",
            "tool": f"search: BM25 (bm25s) over the corpus, top {SEARCH_RESULTS} passages",
        }
    info |= {
        "max_turns": parsed.max_turns,
        "score": "accuracy of the final answer (after the tool calls)",
    }
    return ProblemSet(train, held_out, info)
