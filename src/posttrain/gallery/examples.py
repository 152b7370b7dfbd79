"""The examples: each one's stages (`posttrain train` settings), the data it generates, the document's target
and the bar its verdict must clear. A new example is one entry in `EXAMPLES`."""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from posttrain.util import write_jsonl

# An argument value `{stage:NAME}` is that earlier stage's trained model (tinker:// path).
FROM_STAGE = "{stage:"


@dataclass(frozen=True)
class Stage:
    name: str
    args: tuple[str, ...]


@dataclass(frozen=True)
class Example:
    name: str
    title: str
    target: str  # the document's example, as it states it
    stages: tuple[Stage, ...]
    # whether a reported stage's summary reaches the gallery's bar for this example
    met: Callable[[dict], bool]
    bar: str  # that bar, in words
    make_data: Callable[[Path], None] | None = None  # writes the example's generated data into its folder
    notes: tuple[str, ...] = field(default_factory=tuple)
    # The stages whose results the table reports, each against the bar (empty: the last stage).
    reported: tuple[str, ...] = ()


def _points(summary: dict) -> float:
    return 100 * (summary["trained_score"] - summary["baseline_score"])


def _nll_drop(summary: dict) -> float:
    relative = summary["improvement"].get("relative")
    return 100 * relative if relative is not None else float("nan")


ARITHMETIC = (
    "env=reasoning_gym:basic_arithmetic:min_terms=2,max_terms=2,min_digits=1,max_digits=1,operators=+-,"
    "allow_parentheses=false,allow_negation=false"
)
MATH_RL = Stage(
    "rl",
    (
        ARITHMETIC,
        "batch_size=8",
        "group_size=8",
        "max_tokens=32",
        "max_steps=16",
        "learning_rate=3e-4",
        "max_eval_rows=50",
        "save_every=0",
        "eval_every=0",
    ),
)
CHAT_FILE = "chats.jsonl"


def _write_chats(folder: Path, n: int = 400, seed: int = 0) -> None:
    """Multi-turn conversations (three assistant turns each): a running calculation the user extends turn by
    turn, answered in one fixed style, so every assistant turn has something to learn."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a, b, c, d = (rng.randint(2, 20) for _ in range(4))
        total = a * b
        messages = [
            {"role": "user", "content": f"What is {a} times {b}?"},
            {"role": "assistant", "content": f"{a} × {b} = {total}."},
        ]
        messages += [
            {"role": "user", "content": f"Now add {c}."},
            {"role": "assistant", "content": f"{total} + {c} = {total + c}."},
        ]
        total += c
        messages += [
            {"role": "user", "content": f"And subtract {d}?"},
            {"role": "assistant", "content": f"{total} − {d} = {total - d}."},
        ]
        rows.append({"messages": messages})
    write_jsonl(folder / CHAT_FILE, rows)


PAIRS_FILE = "pairs.jsonl"
# The forms an answer takes; a pair's chosen and rejected answers share one, so only the result tells them apart.
ANSWER_FORMS = (
    "#### {a} {op} {b} = {r}",
    "{a} {op} {b} = {r}\n\n#### {r}",
    "The answer is {r}.\n#### {r}",
    "{a} {op} {b} = {r}. The final answer is {r}.\n#### {r}",
)


def _write_pairs(folder: Path, n: int = 640, seed: int = 0) -> None:
    """Arithmetic preference pairs whose chosen and rejected answers differ only in the result (right vs a near
    miss), in one of a few shared forms. The pairs sampled from the model (src/posttrain/data/
    preference_arithmetic_hardest.jsonl) also differed in form, and DPO learned the form (docs/gallery.md);
    and 640 pairs leave 64 held out, where 164 left 16, too few to tell a gain from noise."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a, b, op = rng.randint(0, 9), rng.randint(0, 9), rng.choice("+-")
        right = a + b if op == "+" else a - b
        wrong = right + rng.choice((-2, -1, 1, 2, 10))
        form = rng.choice(ANSWER_FORMS)
        rows.append(
            {
                "prompt": f"Calculate {a} {op} {b}.\nGive only the final answer after ####.",
                "chosen": form.format(a=a, op=op, b=b, r=right),
                "rejected": form.format(a=a, op=op, b=b, r=wrong),
                "answer": str(right),
            }
        )
    write_jsonl(folder / PAIRS_FILE, rows)


EXAMPLES: dict[str, Example] = {
    e.name: e
    for e in (
        Example(
            "math_rl",
            "Math RL: two-term arithmetic, graded by the math grader",
            "40% -> 65% accuracy",
            (MATH_RL,),
            lambda s: _points(s) >= 20,
            "trained >= base + 20 points on 50 held-out problems",
            notes=(
                "Single-digit sums and differences: the base solves about a third, and most of its failures are "
                "wrong results (`#### 8 - 2 = 4`), not the answer's form.",
            ),
        ),
        Example(
            "code_rl",
            "Code RL: generated function-writing tasks one step past the easy ones, tests in the sandbox",
            "2/10 -> 7/10 tests",
            # max_tokens=96: HumanEval's functions, reported beside the generated tasks, need the room.
            (
                Stage(
                    "rl",
                    (
                        "env=code:harder:humaneval=true",
                        "batch_size=8",
                        "group_size=8",
                        "max_tokens=96",
                        "max_steps=16",
                        "learning_rate=3e-4",
                        "max_eval_rows=50",
                        "save_every=0",
                        "eval_every=0",
                    ),
                ),
            ),
            lambda s: s["baseline_score"] <= 0.3 and _points(s) >= 30,
            "base <= 30% of tests, trained >= +30 points",
            notes=(
                "Of the base's misses (measured: 41 of 50 tasks), about half are right code under a name of its "
                "own (`positive_numbers` for `positives`), which the tests cannot call; the rest wrong code "
                "(`n * cube(n)`, `a * 2 + b`) or code that does not parse.",
            ),
        ),
        Example(
            "game_rl",
            "Game RL: tic-tac-toe against a random opponent",
            "30% -> 70% wins",
            (
                Stage(
                    "rl",
                    (
                        "env=game:tic_tac_toe",
                        "batch_size=4",
                        "group_size=8",
                        "max_tokens=8",
                        "max_steps=16",
                        "learning_rate=3e-4",
                        "max_eval_rows=50",
                        "save_every=0",
                        "eval_every=0",
                    ),
                ),
            ),
            lambda s: s["baseline_score"] <= 0.35 and _points(s) >= 30,
            "base <= 35% wins, trained >= +30 points",
        ),
        Example(
            "instruction_sft",
            "Instruction SFT: the default run",
            "NLL -32%",
            (Stage("sft", ()),),
            lambda s: _nll_drop(s) >= 30,
            "held-out NLL >= 30% lower",
        ),
        Example(
            "chat_sft",
            "Chat SFT: multi-turn conversations, every assistant turn trained",
            "NLL -29%",
            (
                Stage(
                    "sft",
                    (
                        f"dataset={{folder}}/{CHAT_FILE}",
                        "train_on_what=all_assistant_messages",
                        "num_epochs=1",
                        "save_every=0",
                    ),
                ),
            ),
            lambda s: _nll_drop(s) >= 25,
            "held-out NLL >= 25% lower",
            make_data=_write_chats,
        ),
        Example(
            "distillation",
            "Distillation: the math-RL model teaches the base model, off-policy then on-policy",
            "NLL -36%",
            (
                MATH_RL,
                Stage(
                    "off_policy",
                    (
                        "task=distillation",
                        "teacher_model={stage:rl}",
                        ARITHMETIC,
                        "max_train_rows=256",
                        "num_epochs=2",
                        "max_tokens=32",
                        "max_eval_rows=50",
                        "save_every=0",
                        "eval_every=0",
                    ),
                ),
                # The same teacher, on-policy as measured in docs/distillation.md (12 steps of 16, 4 samples each).
                Stage(
                    "on_policy",
                    (
                        "task=distillation",
                        "distillation_mode=on_policy",
                        "teacher_model={stage:rl}",
                        ARITHMETIC,
                        "max_train_rows=256",
                        "batch_size=16",
                        "group_size=4",
                        "max_tokens=32",
                        "max_steps=12",
                        "learning_rate=5e-4",
                        "max_eval_rows=50",
                        "save_every=0",
                        "eval_every=0",
                    ),
                ),
            ),
            lambda s: _nll_drop(s) >= 30,
            "student NLL of the teacher's answers >= 30% lower",
            reported=("off_policy", "on_policy"),
        ),
        Example(
            "dpo",
            "DPO: arithmetic preference pairs (right vs a near miss, in the same form)",
            "(the document's seventh row)",
            (Stage("dpo", (f"dataset={{folder}}/{PAIRS_FILE}", "save_every=0")),),
            lambda s: _points(s) >= 15 and not (s.get("guard") or {}).get("regressed"),
            "held-out preference accuracy >= +15 points, no guard regression",
            make_data=_write_pairs,
        ),
    )
}
