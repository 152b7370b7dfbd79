"""Question/answer data: the math grader for numbers and LaTeX, exact match and token F1 for factual answers."""

from __future__ import annotations

import asyncio

import pytest

from posttrain.pipeline.envs.qa import choose_grader
from posttrain.pipeline.scoring.grading import looks_mathematical, token_f1
from posttrain.pipeline.scoring.scorer import Scorer


@pytest.mark.parametrize(
    "answer",
    [
        "42",
        "-3.5",
        "1,234",
        "3/4",
        "x^2 + 1",
        "\\frac{1}{2}",
        "$2\\sqrt{3}$",
        "50%",
        "(1, 2)",
        "2 pi",
        "sqrt(2)",
    ],
)
def test_mathematical_answers(answer: str):
    assert looks_mathematical(answer)


@pytest.mark.parametrize("answer", ["Paris", "Teodor Vlask", "the 3rd of May", "Apollo 11", "yes", ""])
def test_factual_answers(answer: str):
    assert not looks_mathematical(answer)


def test_token_f1_is_squads():
    assert token_f1("Teodor Vlask", "teodor vlask.") == 1.0  # normalised: case, punctuation
    assert token_f1("The Eiffel Tower", "Eiffel Tower") == 1.0  # articles dropped
    assert token_f1("Vlask", "Teodor Vlask") == pytest.approx(2 / 3)  # precision 1, recall 1/2
    assert token_f1("Paris France", "Lyon") == 0.0 and token_f1("", "Lyon") == 0.0


def test_the_grader_is_chosen_from_the_data_or_by_the_setting():
    numbers = [{"question": "q", "answer": str(i)} for i in range(10)]
    names = [{"question": "q", "answer": n} for n in ("Paris", "Ada Lovelace", "1969", "Jupiter")]
    assert choose_grader(numbers, None)[0] == "math"
    grader, why = choose_grader(names, None)
    assert grader == "f1" and "75% of the answers are text" in why
    assert choose_grader(names, "exact_match") == ("exact_match", "grader=exact_match")
    assert choose_grader(numbers, "f1")[0] == "f1"


def test_f1_rewards_partial_answers_and_correct_means_exact_match():
    scorer = Scorer()
    problem = {"question": "Who built the tower?", "answer": "Teodor Vlask", "grader": "f1"}

    def score(completion: str):
        return asyncio.run(scorer.score(problem, completion, "test"))

    exact, partial, wrong = score("#### teodor vlask"), score("#### Vlask"), score("#### Nobody")
    assert (exact.reward, exact.correct, exact.details) == (1.0, True, {"f1": 1.0})
    assert partial.reward == pytest.approx(2 / 3, abs=1e-4) and partial.correct is False
    assert (wrong.reward, wrong.correct) == (0.0, False)
    problem["grader"] = "exact_match"
    assert (score("#### Vlask").reward, score("#### Teodor Vlask.").correct) == (0.0, True)
