"""Final-answer extraction and grading for verifiable-reward problems, on the cookbook's math grader.

The reward during RL and the accuracy in evaluation both come from here, so the two cannot disagree.
A problem is a dict `{"question", "answer", "grader", ...}` (`scorer.GRADERS` dispatches on the grader):
`grade_math` compares with the cookbook's `safe_grade` (sympy equivalence and normalisation, with a timeout, as
its math_rl recipe does); `grade_reasoning_gym` uses the task's own scorer on the problem's `entry`;
`grade_text` (short factual answers, e.g. a name) is an exact match after the normalisation of the cookbook's
search recipe (`normalize_text`).
"""

from __future__ import annotations

import re
import string
from collections import Counter
from functools import cache
from typing import Any

_NUMBER = re.compile(r"-?\d+(?:\.\d+)?(?:/\d+)?")
# "answer is X" / "answer: X", not any mention of the word ("I'll provide an answer. 6 + 2 = 8" answers 8).
_ANSWER_IS = re.compile(r"\banswer\s*(?:is\b|[:=])\s*([^\n]+)", flags=re.IGNORECASE)
# The cookbook grades with a 1 s limit; a loaded machine needed more for plain equivalences (x^2+2x+1 vs
# (x+1)^2 timed out and was marked wrong under load), and the limit only guards against sympy hanging.
GRADE_TIMEOUT_SECONDS = 5.0
# Appended to every RL question, in training and in evaluation alike, so the answer can be found.
ANSWER_INSTRUCTION = "Give only the final answer after ####."


# An arithmetic expression, "=", a result: numbers, operators and brackets only left of the last "=".
_WORKED_RESULT = re.compile(r"^[\d\s.,+\-*/×÷^()]+=\s*([^=]+)$")


def _gsm8k(text: str) -> str | None:
    from tinker_cookbook.recipes.math_rl.math_env import extract_gsm8k_final_answer

    try:
        return extract_gsm8k_final_answer(text) or None
    except ValueError:
        return None


def _boxed(text: str) -> str | None:
    from tinker_cookbook.recipes.math_rl.math_grading import extract_boxed

    try:
        return extract_boxed(text).strip() or None
    except ValueError:  # no \boxed, or unbalanced braces
        return None


def final_answer(answer: str) -> str:
    """The short answer of a reference solution: GSM8K's '#### x', a LaTeX \\boxed{x}, or the whole answer."""
    found = (_gsm8k(answer) if "####" in answer else None) or (
        _boxed(answer) if "\\boxed" in answer else None
    )
    return found or answer.strip()


def extract_answer(completion: str) -> str:
    """A model's final answer: after the last '####', else the last \\boxed{}, else 'answer is ...', else the
    last number, else the last line."""
    if "####" in completion:
        tail = completion.rsplit("####", 1)[1].strip()
        line = tail.splitlines()[0].strip() if tail else ""
        # "#### 5 + 10 = 15" answers 15: the format was followed, the working shown; only the result is graded.
        worked = _WORKED_RESULT.match(line)
        return worked.group(1).strip() if worked else line
    boxed = _boxed(completion) if "\\boxed" in completion else None
    if boxed:
        return boxed
    match = _ANSWER_IS.search(completion)
    if match:
        return match.group(1).strip().rstrip(".")
    numbers = _NUMBER.findall(completion.replace(",", ""))
    if numbers:
        return numbers[-1]
    lines = completion.strip().splitlines()
    return lines[-1].strip() if lines else ""


@cache
def _reasoning_gym_scorer(task: str) -> Any:
    import reasoning_gym

    return reasoning_gym.get_score_answer_fn(task)


def normalize_text(text: str) -> str:
    """Lower case, no punctuation, no articles, single spaces: `normalize_answer` of the cookbook's search_tool
    recipe (SQuAD's), which cannot be imported without that recipe's chromadb and Gemini dependencies."""
    text = "".join(ch for ch in text.lower() if ch not in string.punctuation)
    return " ".join(re.sub(r"\b(a|an|the)\b", " ", text).split())


def grade_math(problem: dict, extracted: str) -> bool:
    """The cookbook's math grader (sympy equivalence, with a timeout) against the problem's answer."""
    if not extracted.strip():
        return False
    from tinker_cookbook.recipes.math_rl.math_env import safe_grade

    return bool(safe_grade(extracted, str(problem["answer"]), grader="sympy", timeout=GRADE_TIMEOUT_SECONDS))


def grade_text(problem: dict, extracted: str) -> bool:
    """Exact match after normalisation (short factual answers, e.g. a name)."""
    return bool(extracted.strip()) and normalize_text(extracted) == normalize_text(str(problem["answer"]))


def token_f1(prediction: str, truth: str) -> float:
    """SQuAD's token F1 between two answers after `normalize_text`: partial credit for a partly right answer."""
    predicted, expected = normalize_text(prediction).split(), normalize_text(truth).split()
    common = sum((Counter(predicted) & Counter(expected)).values())
    if not predicted or not expected or common == 0:
        return float(predicted == expected)
    precision, recall = common / len(predicted), common / len(expected)
    return 2 * precision * recall / (precision + recall)


# Words a mathematical answer may contain (LaTeX commands aside, which make an answer mathematical anyway).
_MATH_WORDS = frozenset(
    {"sqrt", "pi", "inf", "infty", "frac", "log", "ln", "sin", "cos", "tan", "mod", "and"}
)


def looks_mathematical(answer: str) -> bool:
    """A number, a fraction, an expression or LaTeX: what the math grader compares (not a name or a phrase)."""
    text = answer.strip()
    if "\\" in text or "$" in text:
        return True
    words = re.findall(r"[A-Za-z]{2,}", text)
    return bool(re.search(r"\d", text)) and all(w.lower() in _MATH_WORDS for w in words)


def grade_reasoning_gym(problem: dict, extracted: str) -> bool:
    """The reasoning-gym task's own scorer on the problem's entry."""
    return float(_reasoning_gym_scorer(problem["task"])(extracted, problem["entry"])) >= 1.0
