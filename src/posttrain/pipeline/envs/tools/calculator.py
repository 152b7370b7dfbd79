"""`env=tools:calculator`: multi-step arithmetic word problems (generated; held-out problems from another seed) and a
calculator tool that evaluates arithmetic with `safe_eval`, an `ast` whitelist (numbers, + - * / // % ** and
parentheses; names, calls, attributes, strings and everything else are refused; nothing is ever executed)."""

from __future__ import annotations

import ast
import math
import operator
import random
from collections.abc import Callable
from typing import Annotated, Any

from tinker_cookbook.tool_use import ToolResult, error_tool_result, simple_tool_result, tool

SOURCE = "generated multi-step arithmetic word problems"

INSTRUCTIONS = "Use the calculator tool for the arithmetic. Then give only the final answer after ####."
# A worked example in the renderer's own tool-call format: question, call arguments, the tool's answer, the answer.
EXAMPLE = (
    "A crate holds 24 jars. Ann has 37 crates and breaks 15 jars. How many jars are left?",
    {"expression": "24*37-15"},
    "873",
    "873",
)


class CalculatorError(ValueError):
    """An expression the calculator does not evaluate (not arithmetic, too big, division by zero)."""


_BINARY: dict[type, Callable[[Any, Any], Any]] = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
    ast.Pow: operator.pow,
}
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
        f"A library has {a} shelves with {b} books on each shelf. {c} new books arrive. "
        "How many books does it have now?",
        a * b + c,
    )


def _crayons(r: random.Random) -> tuple[str, int]:
    a, b, c = r.randint(12, 99), r.randint(12, 64), r.randint(11, 99)
    return (
        f"A school orders {a} boxes of {b} crayons and {c} single crayons. How many crayons is that in all?",
        a * b + c,
    )


_WORD_PROBLEMS = (_pencils, _change, _train, _legs, _bags, _savings, _books, _crayons)


def problems(split: str, n: int, seed: int) -> list[dict]:
    """`n` generated word problems (both splits are generated; they differ by seed)."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        question, answer = rng.choice(_WORD_PROBLEMS)(rng)
        out.append({"question": question, "answer": str(answer), "grader": "math"})
    return out


@tool
async def calculator(expression: Annotated[str, "an arithmetic expression, e.g. 24*37-15"]) -> ToolResult:
    """Evaluate an arithmetic expression: numbers, + - * / // % ** and parentheses."""
    try:
        return simple_tool_result(format_number(safe_eval(expression)))
    except CalculatorError as exc:
        return error_tool_result(str(exc), error_type="calculator_error")


TOOLS = [calculator]
