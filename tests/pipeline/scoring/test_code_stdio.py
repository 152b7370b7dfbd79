"""Code problems judged on stdin/stdout (LiveCodeBench / DeepCoder layouts): parsing the rows, one-line errors
for bad ones, and grading real programs in the real bubblewrap sandbox (correct, wrong, timeout, crash)."""

from __future__ import annotations

import asyncio
import json
import shutil
import time
from pathlib import Path

import pytest

from posttrain.errors import DataError
from posttrain.pipeline.data import DataRequest, load_data
from posttrain.pipeline.envs.base import prompt_messages
from posttrain.pipeline.envs.registry import default_env
from posttrain.pipeline.methods.choice import choose_task
from posttrain.pipeline.scoring import code as code_tasks
from posttrain.pipeline.scoring import code_problems, code_stdio, sandbox
from posttrain.pipeline.scoring.scorer import Scorer
from posttrain.pipeline.settings import TrainConfig

needs_bwrap = pytest.mark.skipif(shutil.which("bwrap") is None, reason="bubblewrap is not installed")

LIMITS = sandbox.Limits(timeout_s=2.0)
SUM = {
    "question": "Read two integers on one line and print their sum.",
    "inputs": ["1 2\n", "5 7\n", "-3 3\n"],
    "outputs": ["3\n", "12\n", "0\n"],
}


def _write(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _load(path: Path):
    return load_data(DataRequest(str(path), max_train_rows=100, max_eval_rows=0, seed=1))


def _grade(completion_code: str, problem: dict | None = None) -> code_tasks.CodeResult:
    problem = problem or code_problems.problem_from_row(SUM, "test")
    return code_stdio.grade(problem, f"Here it is:\n```python\n{completion_code}\n```\n", LIMITS)


# ------------------------------------------------------------------------------------------- the layouts


def test_the_three_layouts_become_the_same_problem_with_the_program_instruction():
    pairs = [{"input": i, "output": o} for i, o in zip(SUM["inputs"], SUM["outputs"], strict=True)]
    layouts = [
        SUM,
        {"problem": SUM["question"], "tests": pairs},
        {"prompt": SUM["question"], "tests": json.dumps([{**p, "testtype": "stdin"} for p in pairs])},
    ]
    for row in layouts:
        problem = code_problems.problem_from_row(row, "test")
        assert problem["grader"] == "code_stdio" and problem["tests"] == pairs
        assert problem["question"] == SUM["question"]
        prompt = prompt_messages(problem)[0]["content"]
        assert "reads its input from standard input" in prompt and "```python" in prompt
    # The assert form keeps its grader and instruction.
    asserts = code_problems.problem_from_row({"question": "f", "tests": ["assert f(1) == 1"]}, "test")
    assert asserts["grader"] == "code" and asserts["instruction"] == code_tasks.CODE_INSTRUCTION


def test_a_file_of_stdio_problems_is_code_data_and_task_auto_picks_rl_with_env_code(tmp_path: Path):
    rows = [{**SUM, "question": f"{SUM['question']} ({i})"} for i in range(4)]
    data = _load(_write(tmp_path / "stdio.jsonl", rows))
    assert data.format == "code"
    assert choose_task(TrainConfig(dataset=str(tmp_path / "stdio.jsonl")), data)[0] == "rl"
    assert default_env(data.format) == "code"
    # The normalized row is what env=code builds its problems from.
    problem = code_problems.problem_from_row(data.train[0], "row 1")
    assert problem["grader"] == "code_stdio" and problem["tests"][1] == {"input": "5 7\n", "output": "12\n"}


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ({"question": "q", "inputs": ["1\n"]}, 'field "outputs" is missing'),
        (
            {"question": "q", "inputs": ["1", "2"], "outputs": ["1"]},
            'field "outputs" has 1 items but "inputs" has 2',
        ),
        (
            {"question": "q", "inputs": ["1", 2], "outputs": ["1", "2"]},
            'field "inputs[1]" must be a string, got int',
        ),
        (
            {"question": "q", "inputs": [], "outputs": []},
            'field "inputs" must be a non-empty list of strings',
        ),
        ({"question": "q", "tests": [{"input": "1"}]}, 'field "tests[0].output" is missing'),
        (
            {"question": "q", "tests": [{"input": "1", "output": 2}]},
            'field "tests[0].output" must be a string',
        ),
        ({"question": "q", "tests": [{"output": "1"}]}, 'field "tests[0].input" is missing'),
        ({"question": "q", "tests": '[{"input": "1"'}, 'field "tests" is a string but not a JSON list'),
        (
            {"question": "q", "tests": [{"input": "1", "output": "1", "testtype": "functional"}]},
            'field "tests[0].testtype" is \'functional\'; only "stdin" tests are supported',
        ),
        (
            {"question": "q", "tests": [{"input": "1", "output": "1"}, "assert f(1) == 1"]},
            'field "tests[1]" must be an {"input", "output"} object, got str',
        ),
        (
            {"question": "q", "tests": [{"input": "1", "output": "1"}], "inputs": ["1"], "outputs": ["1"]},
            'has either "tests" or "inputs"/"outputs", not both',
        ),
    ],
)
def test_a_bad_row_is_one_line_naming_the_file_row_and_field(tmp_path: Path, row: dict, message: str):
    good = {"question": "q", "tests": [{"input": "1", "output": "1"}]}
    if "inputs" in row and "tests" not in row:
        good = {"question": "q", "inputs": ["1"], "outputs": ["1"]}
    path = _write(tmp_path / "bad.jsonl", [good, row])
    with pytest.raises(DataError) as exc:
        _load(path)
    text = str(exc.value)
    assert text.startswith(f"{path} line 2: ") and message in text, text
    assert "\n" not in text


# ----------------------------------------------------------------------------------------------- grading


@needs_bwrap
@pytest.mark.parametrize(
    "program",
    [
        "a, b = map(int, input().split())\nprint(a + b)",
        "import sys\nprint(sum(map(int, sys.stdin.read().split())))",
        "def main():\n    print(sum(int(x) for x in open(0).read().split()))\n\nif __name__ == '__main__':\n    main()",
        # Trailing spaces and blank lines do not matter; a clean exit through sys.exit(0) is not a crash.
        "import sys\nprint(sum(map(int, input().split())), '  ')\nprint()\nprint('   ')\nsys.exit(0)",
    ],
)
def test_a_correct_program_passes_every_test(program: str):
    result = _grade(program)
    assert (result.reward, result.passed, result.total, result.note) == (1.0, 3, 3, "")
    assert result.per_test == ({"passed": True},) * 3
    assert result.code == program


@needs_bwrap
def test_wrong_answers_score_the_fraction_passed_with_a_reason_per_test():
    result = _grade("a, b = map(int, input().split())\nprint(a + b if a > 0 else 99)")
    assert (result.passed, result.total) == (2, 3) and result.reward == pytest.approx(2 / 3)
    assert result.per_test[2] == {"passed": False, "failure": "wrong answer"}
    assert result.note == "test 3: wrong answer"
    # Inner whitespace is compared as is: only trailing whitespace is forgiven.
    assert _grade("a, b = input().split()\nprint(' ' + str(int(a) + int(b)))").passed == 0


@needs_bwrap
def test_a_crash_is_a_runtime_error_naming_the_exception_and_other_tests_still_run():
    result = _grade("a, b = map(int, input().split())\nprint(a + b if a != 5 else 1 // 0)")
    assert result.passed == 2
    assert result.per_test[1] == {"passed": False, "failure": "runtime error: ZeroDivisionError"}
    assert _grade("import sys\nsys.exit(3)").per_test[0]["failure"] == "runtime error: exit code 3"


@needs_bwrap
def test_a_program_that_does_not_compile_fails_every_test_after_one_run():
    result = _grade("def main(:\n    pass")
    assert result.reward == 0.0
    assert [t["failure"] for t in result.per_test] == ["does not compile: SyntaxError"] * 3


@needs_bwrap
def test_a_timeout_is_cut_at_the_limit_and_the_remaining_tests_are_not_run():
    started = time.monotonic()
    result = _grade("a, b = map(int, input().split())\nwhile a == 5:\n    pass\nprint(a + b)")
    assert time.monotonic() - started < LIMITS.timeout_s + 3
    assert result.passed == 1
    assert [t.get("failure") for t in result.per_test] == [
        None,
        "timeout",
        "not run: an earlier test timed out",
    ]


@needs_bwrap
def test_the_expected_output_never_enters_the_sandbox():
    # A program that prints any line like the answer it finds next to it would pass if the answer were there.
    snoop = (
        "import os\n"
        "for d in ('/sandbox', '/tmp'):\n"
        "    for n in os.listdir(d):\n"
        "        for line in open(os.path.join(d, n)).read().splitlines():\n"
        "            if line.startswith('SECRET-') and 'print' not in line:\n"
        "                print(line)\n"
    )
    problem = code_problems.problem_from_row(
        {"question": "q", "inputs": ["x\n"], "outputs": ["SECRET-42\n"]}, "t"
    )
    result = _grade(snoop, problem)
    assert result.passed == 0 and result.per_test[0]["failure"] == "wrong answer"


@needs_bwrap
def test_the_scorer_reports_per_test_results_in_the_rows_details():
    problem = code_problems.problem_from_row(SUM, "test")
    completion = "```python\na, b = map(int, input().split())\nprint(a + b if a < 5 else 0)\n```"
    scored = asyncio.run(Scorer().score(problem, completion, "eval"))
    assert scored.reward == pytest.approx(2 / 3) and scored.correct is False
    assert scored.details["tests_passed"] == 2 and scored.details["tests_total"] == 3
    assert scored.details["tests"][1] == {"passed": False, "failure": "wrong answer"}
    assert scored.extracted.startswith("a, b = map(int")


def test_the_program_is_the_last_python_block():
    completion = "First try:\n```python\nprint(1)\n```\nBetter:\n```\n```python\nprint(2)\n```\nDone."
    assert code_stdio.extract_program(completion) == "print(2)"
    assert code_stdio.extract_program("n = int(input())\nprint(n)") == "n = int(input())\nprint(n)"
    assert code_stdio.normalize_output("1  \n2\t\n\n \n") == code_stdio.normalize_output("1\n2") == "1\n2"
