"""The settings of question/answer environments (`env=math`, the default for question/answer data); a light
module, read when the command line is (the environment itself, `envs.qa`, loads the cookbook)."""

from __future__ import annotations

from typing import Literal

import chz

# How question/answer data is graded (scoring.GRADERS): the math grader, or for factual answers exact match / token F1.
AnswerGrader = Literal["math", "exact_match", "f1"]


@chz.chz
class AnswerGraderOptions:
    grader: AnswerGrader | None = chz.field(
        default=None,
        doc="question/answer data: math|exact_match|f1 (None: from the data: math when the answers are numbers, "
        "expressions or LaTeX, else f1, the token F1 as the reward with exact match as `correct`)",
    )
