"""A code problem from a data row, in either form: `assert` tests (`code`) or stdin/stdout tests (`code_stdio`)."""

from __future__ import annotations

from posttrain.pipeline.scoring import code, code_stdio


def problem_from_row(row: dict, where: str) -> dict:
    """The problem a row describes; a one-line DataError naming `where` and the field when it is malformed."""
    if code_stdio.is_stdio_row(row):
        return code_stdio.problem_from_row(row, code.statement_of(row, where), where)
    return code.problem_from_row(row, where)
