"""Row formats: which known layout a row uses, and how each layout becomes one normalized shape.

Chat-like layouts (messages, prompt/completion, alpaca instruction, ShareGPT) all become
`{"messages": [{"role", "content"}, ...]}` ending with a non-empty assistant message; question/answer
layouts become `{"question", "answer", "final_answer"}`; preference pairs become
`{"prompt": [messages], "chosen", "rejected"}`, plus `"answer"` (the final answer) when the row carries a ground
truth (`answer` or `ground_truth`, e.g. pairs made from a verifiable task); rubric rows become
`{"messages": [...ending with a user turn], "rubric": [{"criterion", "weight"}, ...]}`; twenty questions' rows
become `{"secret"}`; image classification rows `{"image", "label"}` (`images.py`). Every error names `where`
(file + line, or dataset + row)
and the offending field, so a user can fix the row without reading a traceback.

A format is one entry of `FORMATS` (its name in `FormatName`): how a row is detected, the fields the first row
commits the others to, how a row is normalized. A new format is one entry there and one name in `FormatName`.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, get_args

from posttrain.errors import DataError
from posttrain.pipeline.scoring.grading import final_answer

FormatName = Literal[
    "messages",
    "prompt_completion",
    "instruction",
    "sharegpt",
    "question_answer",
    "preference",
    "code",
    "rubric",
    "secret",
    "image",
]

CHAT_FORMATS: frozenset[str] = frozenset({"messages", "prompt_completion", "instruction", "sharegpt"})

# Tried in this order; the first pair present names the question and the answer.
QA_FIELD_PAIRS: tuple[tuple[str, str], ...] = (
    ("question", "answer"),
    ("problem", "solution"),
    ("question", "ground_truth"),
    ("prompt", "ground_truth"),
    ("problem", "answer"),
)

# ShareGPT and OpenAI-style exports use several names for the same three roles.
_ROLE_ALIASES: dict[str, str] = {
    "system": "system",
    "user": "user",
    "human": "user",
    "assistant": "assistant",
    "gpt": "assistant",
    "model": "assistant",
    "chatgpt": "assistant",
    "tool": "tool",
    "function": "tool",
    "observation": "tool",
}

# Rubric rows: the conversation so far (ending with the user's turn) under one of these names, the items under
# one of RUBRIC_KEYS (`convo`/`rubric_items` is the cookbook's rubric recipe's layout).
RUBRIC_KEYS = ("rubric", "rubric_items")
RUBRIC_CONVERSATION_KEYS = ("messages", "convo", "prompt")


def _has(row: dict, key: str) -> bool:
    # Hugging Face fills columns a row lacks with None, so None means "absent" here.
    return row.get(key) is not None


def _type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _qa_pair(row: dict) -> tuple[str, str] | None:
    for question_key, answer_key in QA_FIELD_PAIRS:
        if _has(row, question_key) and _has(row, answer_key):
            return question_key, answer_key
    return None


# --- chat messages -----------------------------------------------------------------------------


def _content_text(value: Any, where: str, field: str) -> str:
    if isinstance(value, str):
        return value
    # OpenAI-style content parts: only text parts can be trained on by a text model.
    if isinstance(value, list) and all(isinstance(p, dict) for p in value):
        texts: list[str] = []
        for i, part in enumerate(value):
            if part.get("type", "text") != "text" or not isinstance(part.get("text"), str):
                raise DataError(
                    f'{where}: field "{field}[{i}]" must be a text part {{"type": "text", "text": str}}, '
                    f"got type {part.get('type')!r}"
                )
            texts.append(part["text"])
        return "".join(texts)
    raise DataError(f'{where}: field "{field}" must be a string, got {_type_name(value)}')


def _parse_message(message: Any, where: str, field: str) -> dict[str, str]:
    if not isinstance(message, dict):
        raise DataError(
            f'{where}: field "{field}" must be a {{role, content}} object, got {_type_name(message)}'
        )
    # ShareGPT uses from/value; OpenAI style uses role/content. Accept either in both layouts.
    role_key = "role" if "role" in message else "from"
    content_key = "content" if "content" in message else "value"
    if role_key not in message:
        raise DataError(f'{where}: field "{field}" has no "role" (or "from"); keys: {", ".join(message)}')
    if content_key not in message:
        raise DataError(f'{where}: field "{field}" has no "content" (or "value"); keys: {", ".join(message)}')
    raw_role = message[role_key]
    role = _ROLE_ALIASES.get(raw_role.strip().lower()) if isinstance(raw_role, str) else None
    if role is None:
        raise DataError(
            f'{where}: field "{field}.{role_key}" must be one of system, user, assistant, tool '
            f"(or human, gpt), got {raw_role!r}"
        )
    content = _content_text(message[content_key], where, f"{field}.{content_key}")
    return {"role": role, "content": content}


def _parse_messages(value: Any, where: str, field: str) -> list[dict[str, str]]:
    if not isinstance(value, list) or not value:
        got = "an empty list" if isinstance(value, list) else _type_name(value)
        raise DataError(
            f'{where}: field "{field}" must be a non-empty list of {{role, content}} objects, got {got}'
        )
    return [_parse_message(m, where, f"{field}[{i}]") for i, m in enumerate(value)]


def _require_assistant_last(messages: list[dict[str, str]], where: str, field: str) -> list[dict[str, str]]:
    last = messages[-1]
    if last["role"] != "assistant":
        raise DataError(
            f'{where}: field "{field}" must end with an assistant message to train on, '
            f'but the last message has role "{last["role"]}"'
        )
    if not last["content"].strip():
        raise DataError(
            f'{where}: field "{field}[{len(messages) - 1}].content" (the last assistant message) is empty'
        )
    return messages


def _non_empty_str(row: dict, field: str, where: str) -> str:
    value = row.get(field)
    if not isinstance(value, str):
        raise DataError(f'{where}: field "{field}" must be a string, got {_type_name(value)}')
    if not value.strip():
        raise DataError(f'{where}: field "{field}" is empty')
    return value


def _instruction_messages(row: dict, where: str) -> list[dict[str, str]]:
    instruction = _non_empty_str(row, "instruction", where)
    output = _non_empty_str(row, "output", where)
    extra = row.get("input")
    if extra is not None and not isinstance(extra, str):
        raise DataError(f'{where}: field "input" must be a string, got {_type_name(extra)}')
    system = row.get("system")
    if system is not None and not isinstance(system, str):
        raise DataError(f'{where}: field "system" must be a string, got {_type_name(system)}')
    user = f"{instruction}\n\n{extra}" if extra and extra.strip() else instruction
    messages = [{"role": "system", "content": system}] if system and system.strip() else []
    return [*messages, {"role": "user", "content": user}, {"role": "assistant", "content": output}]


def _side(value: Any, where: str, field: str, default_role: str) -> list[dict[str, str]]:
    """A prompt/completion side given either as plain text or as a list of messages."""
    if isinstance(value, str):
        if not value.strip():
            raise DataError(f'{where}: field "{field}" is empty')
        return [{"role": default_role, "content": value}]
    if isinstance(value, list):
        return _parse_messages(value, where, field)
    raise DataError(
        f'{where}: field "{field}" must be a string or a list of {{role, content}} objects, got {_type_name(value)}'
    )


def _prompt_completion_messages(row: dict, where: str) -> list[dict[str, str]]:
    prompt = _side(row["prompt"], where, "prompt", "user")
    completion = _side(row["completion"], where, "completion", "assistant")
    return _require_assistant_last([*prompt, *completion], where, "completion")


# --- preference pairs ----------------------------------------------------------------------------


# Fields of a preference row that hold the ground truth of a verifiable prompt, first found wins.
PREFERENCE_ANSWER_FIELDS = ("answer", "ground_truth")
# Anthropic HH-RLHF keeps each side as one string: "\n\nHuman: ...\n\nAssistant: ...".
_HH_TURN = re.compile(r"(?:^|\n\n)(Human|Assistant):[ \t]?")
_HH_ROLES = {"Human": "user", "Assistant": "assistant"}


def _hh_messages(text: str) -> list[dict[str, str]] | None:
    """The turns of an HH-style transcript, or None when the text is not one (plain response text)."""
    marks = list(_HH_TURN.finditer(text))
    if len(marks) < 2 or text[: marks[0].start()].strip():
        return None
    return [
        {"role": _HH_ROLES[m.group(1)], "content": text[m.end() : nxt.start() if nxt else len(text)].strip()}
        for m, nxt in zip(marks, [*marks[1:], None], strict=True)
    ]


def _response_text(value: Any, where: str, field: str) -> tuple[str, list[dict[str, str]]]:
    """The response text of a chosen/rejected side, plus the turns before it when given as a conversation
    (a list of messages, or an HH-style "Human: ... Assistant: ..." transcript)."""
    hh = _hh_messages(value) if isinstance(value, str) else None
    messages = hh if hh is not None else _side(value, where, field, "assistant")
    _require_assistant_last(messages, where, field)
    return messages[-1]["content"], messages[:-1]


def _preference(row: dict, where: str) -> dict:
    chosen, chosen_context = _response_text(row["chosen"], where, "chosen")
    rejected, rejected_context = _response_text(row["rejected"], where, "rejected")
    if _has(row, "prompt"):
        prompt = _side(row["prompt"], where, "prompt", "user")
    elif chosen_context:
        # The implicit-prompt form: both sides are whole conversations; the shared turns are the prompt.
        if rejected_context and rejected_context != chosen_context:
            raise DataError(
                f'{where}: field "rejected" does not share the conversation before its last reply with '
                f'"chosen" (the implicit prompt); give a "prompt" field or make both sides share it'
            )
        prompt = chosen_context
    else:
        raise DataError(
            f'{where}: field "prompt" is missing and "chosen" holds no earlier turns to use as the prompt'
        )
    if chosen.strip() == rejected.strip():
        raise DataError(f'{where}: field "rejected" is the same text as "chosen"; a pair needs two answers')
    pair = {"prompt": prompt, "chosen": chosen, "rejected": rejected}
    # A verifiable pair (e.g. from scripts/make_preference_pairs.py): its answer lets the evaluation also
    # sample and grade the model (task accuracy).
    for key in PREFERENCE_ANSWER_FIELDS:
        if key in row and row[key] is not None:
            pair["answer"] = final_answer(_answer_text(row[key], where, key))
            break
    return pair


# --- question / answer -----------------------------------------------------------------------------


def _answer_text(value: Any, where: str, field: str) -> str:
    # Ground-truth columns are often numeric; bool is an int subclass but never a real answer.
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise DataError(f'{where}: field "{field}" must be a string or a number, got {_type_name(value)}')
    text = str(value)
    if not text.strip():
        raise DataError(f'{where}: field "{field}" is empty')
    return text


def _question_answer(row: dict, where: str) -> dict:
    pair = _qa_pair(row)
    if pair is None:
        raise DataError(
            f'{where}: field "question" or "answer" is missing (required by the "question_answer" format)'
        )
    question_key, answer_key = pair
    question = _non_empty_str(row, question_key, where)
    answer = _answer_text(row[answer_key], where, answer_key)
    return {"question": question, "answer": answer, "final_answer": final_answer(answer)}


# --- rubrics ---------------------------------------------------------------------------------------


def _rubric(row: dict, where: str) -> dict:
    conversation_key = next((k for k in RUBRIC_CONVERSATION_KEYS if _has(row, k)), None)
    if conversation_key is None:
        raise DataError(
            f'{where}: field "messages" is missing (a rubric row needs the conversation to answer: '
            '"messages" or "convo", a list of {role, content}, or "prompt", a string)'
        )
    messages = _side(row[conversation_key], where, conversation_key, "user")
    if messages[-1]["role"] != "user":
        raise DataError(
            f'{where}: field "{conversation_key}" must end with the user\'s turn (the policy writes the next '
            f'reply), but the last message has role "{messages[-1]["role"]}"'
        )
    key = next(k for k in RUBRIC_KEYS if _has(row, k))
    items = row[key]
    if not isinstance(items, list) or not items:
        got = "an empty list" if isinstance(items, list) else _type_name(items)
        raise DataError(
            f'{where}: field "{key}" must be a non-empty list of criteria (strings, or '
            f'{{"criterion", "weight"}} objects), got {got}'
        )
    return {
        "messages": messages,
        "rubric": [_rubric_item(x, where, f"{key}[{i}]") for i, x in enumerate(items)],
    }


def _rubric_item(item: Any, where: str, field: str) -> dict:
    if isinstance(item, str):
        item = {"criterion": item}
    if not isinstance(item, dict):
        raise DataError(
            f'{where}: field "{field}" must be a string or a {{"criterion", "weight"}} object, '
            f"got {_type_name(item)}"
        )
    # The cookbook's Rubric names the criterion rubric_str.
    name = "criterion" if "criterion" in item or "rubric_str" not in item else "rubric_str"
    criterion = item.get(name)
    if not isinstance(criterion, str) or not criterion.strip():
        got = "an empty string" if isinstance(criterion, str) else _type_name(criterion)
        raise DataError(f'{where}: field "{field}.{name}" must be a non-empty string, got {got}')
    weight = item.get("weight", 1.0)
    if (
        isinstance(weight, bool)
        or not isinstance(weight, int | float)
        or not weight > 0
        or weight == float("inf")
    ):
        raise DataError(f'{where}: field "{field}.weight" must be a number > 0, got {weight!r}')
    return {"criterion": criterion.strip(), "weight": float(weight)}


# --- the table -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Format:
    """One row layout: how a row is recognised, which fields the first row commits the rest to, and how a row
    becomes the normalized shape (validating every field it uses)."""

    name: FormatName
    layout: str  # as the "no known data format" error lists it
    detect: Callable[[dict], bool]
    required: Callable[[dict], tuple[str, ...]]
    normalize: Callable[[dict, str], dict]


def _fields(*names: str) -> Callable[[dict], tuple[str, ...]]:
    return lambda row: names


def _conversation(field: str) -> Callable[[dict, str], dict]:
    def normalize(row: dict, where: str) -> dict:
        return {"messages": _require_assistant_last(_parse_messages(row[field], where, field), where, field)}

    return normalize


# Assert strings or stdin/stdout tests under "tests"; stdin/stdout tests also as inputs/outputs lists.
_CODE_TEST_KEYS = ("tests", "inputs", "outputs")


def _is_code(row: dict) -> bool:
    statement = any(_has(row, k) for k in ("question", "prompt", "problem"))
    return statement and any(_has(row, k) for k in _CODE_TEST_KEYS)


def _code(row: dict, where: str) -> dict:
    from posttrain.pipeline.scoring.code_problems import problem_from_row

    problem = problem_from_row(row, where)  # validates the statement and every test
    # stdin/stdout problems have no entry point; their tests become [{"input", "output"}], one layout for all.
    return {k: problem[k] for k in ("question", "tests", "entry_point") if k in problem}


def _secret(row: dict, where: str) -> dict:
    secret = _non_empty_str(row, "secret", where).strip()
    if "\n" in secret:
        raise DataError(
            f'{where}: field "secret" must be one line (a word or a short phrase the player can guess)'
        )
    return {"secret": secret}


def _image(row: dict, where: str) -> dict:
    from posttrain.pipeline.data.images import image_row

    return image_row(row, where)  # checks that a local image exists and decodes


def _qa_fields(row: dict) -> tuple[str, ...]:
    pair = _qa_pair(row)
    return pair if pair is not None else QA_FIELD_PAIRS[0]


# Every format, in the order rows are matched against them: the first whose `detect` holds names the row.
FORMATS: tuple[Format, ...] = (
    # Preference rows often also carry "prompt", so they must win over prompt/completion.
    Format(
        "preference",
        "prompt+chosen+rejected",
        lambda r: _has(r, "chosen") and _has(r, "rejected"),
        lambda r: ("prompt", "chosen", "rejected") if _has(r, "prompt") else ("chosen", "rejected"),
        _preference,
    ),
    # Before messages: a rubric row's conversation is a "messages" list too.
    Format(
        "rubric",
        "rubrics: messages (or convo, prompt)+rubric (or rubric_items)",
        lambda r: any(_has(r, k) for k in RUBRIC_KEYS),
        lambda r: (next((k for k in RUBRIC_KEYS if _has(r, k)), RUBRIC_KEYS[0]),),
        _rubric,
    ),
    # Before prompt/completion and question/answer: a code problem may carry either too.
    Format(
        "code",
        "code problems: question (or prompt, problem)+tests (or inputs+outputs, stdin/stdout)",
        _is_code,
        lambda r: (next((k for k in _CODE_TEST_KEYS if _has(r, k)), "tests"),),
        _code,
    ),
    Format(
        "messages", "messages", lambda r: _has(r, "messages"), _fields("messages"), _conversation("messages")
    ),
    Format(
        "sharegpt",
        "conversations (ShareGPT)",
        lambda r: _has(r, "conversations"),
        _fields("conversations"),
        _conversation("conversations"),
    ),
    Format(
        "instruction",
        "instruction+output",
        lambda r: _has(r, "instruction") and _has(r, "output"),
        _fields("instruction", "output"),
        lambda r, where: {"messages": _instruction_messages(r, where)},
    ),
    Format(
        "prompt_completion",
        "prompt+completion",
        lambda r: _has(r, "prompt") and _has(r, "completion"),
        _fields("prompt", "completion"),
        lambda r, where: {"messages": _prompt_completion_messages(r, where)},
    ),
    Format(
        "question_answer",
        "question+answer (or problem+solution, question+ground_truth, prompt+ground_truth, problem+answer)",
        lambda r: _qa_pair(r) is not None,
        _qa_fields,
        lambda r, where: _question_answer(r, where),
    ),
    # Twenty questions' secrets (env=game:twenty_questions): one per row.
    Format(
        "secret", "secret (one secret word per row)", lambda r: _has(r, "secret"), _fields("secret"), _secret
    ),
    # Image classification (the cookbook's vlm_classifier recipe): an image path or URL and its class.
    # Only "image" commits later rows: a missing label is reported by the row's own check, naming the field.
    Format("image", "image (a path or URL)+label", lambda r: _has(r, "image"), _fields("image"), _image),
)
_BY_NAME = {f.name: f for f in FORMATS}
assert set(_BY_NAME) == set(get_args(FormatName)), "every FormatName has one entry in FORMATS"


def detect_format(row: dict, where: str) -> FormatName:
    """The layout of one row; raises DataError naming `where` and the fields found if none fits."""
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected an object with named fields, got {_type_name(row)}")
    for fmt in FORMATS:
        if fmt.detect(row):
            return fmt.name
    fields = ", ".join(sorted(str(k) for k in row)) or "none"
    layouts = "; ".join(f.layout for f in FORMATS)
    raise DataError(f"{where}: no known data format (fields found: {fields}); expected one of: {layouts}")


def required_fields(row: dict, fmt: FormatName) -> tuple[str, ...]:
    """The fields the first row of a dataset commits every later row to carry."""
    return _BY_NAME[fmt].required(row)


def normalize_row(row: dict, fmt: FormatName, where: str) -> dict:
    """Convert one row of a known layout into its normalized shape, validating every field it uses."""
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected an object with named fields, got {_type_name(row)}")
    if fmt not in _BY_NAME:
        raise DataError(f"{where}: unknown data format {fmt!r}")
    for field in required_fields(row, fmt):
        if not _has(row, field):
            raise DataError(f'{where}: field "{field}" is missing (required by the "{fmt}" format)')
    return _BY_NAME[fmt].normalize(row, where)
