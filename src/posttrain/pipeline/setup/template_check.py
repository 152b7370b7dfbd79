"""Before training a lineup model: the renderer must write the user's rows token for token as the model's own
chat template (`tokenizer.apply_chat_template`) does. A renderer that differs trains the model on a format it
is never prompted with (cookbook users lost runs to this: tinker-cookbook #233, #837); the run stops first.

What is compared, for a few of the run's own rows (chat rows, RL prompts, preference prompts) plus one fixed
conversation with a system message and two turns:

- the **training form**: `renderer.build_supervised_example(row)` against the template's text for the whole
  conversation (`add_generation_prompt=False`), tokenized without added special tokens;
- the **prompt form**: `renderer.build_generation_prompt(prompt)` against the template with
  `add_generation_prompt=True`, where `prompt` is the row up to its last user message (what sampling, RL and
  evaluation send).

Qwen3's thinking modes are compared with the template's matching switch: `qwen3` against
`enable_thinking=True`, `qwen3_disable_thinking` against `enable_thinking=False` (and `deepseekv3_thinking`
against `thinking=True`, its prompt form only: see PROMPT_FORM_ONLY). `qwen3_instruct` (for the
2507 Instruct models, whose template has no thinking) is compared with the template as it is, so on a hybrid
model such as Qwen3-8B it is refused: the hybrid template writes an empty `<think>` block into the trained turn.

Differences that are conventions, not errors (the rule, applied to every pair):

1. After the final end-of-turn token (the renderer's stop token, the last token trained on) the template may
   write more: Qwen3 a newline, Llama 3's template an unconditional `<|start_header_id|>assistant...` header.
   Nothing after that token is trained on, so the training form compares up to it.
2. Message text is compared stripped of surrounding whitespace: Llama 3's template trims every message and the
   renderer keeps the text as given; that is a property of a row, not of the format.
3. Llama 3.1's template writes a "Cutting Knowledge Date: ... Today Date: ..." preamble into the system message;
   the cookbook's `llama3` renderer deliberately does not (its docstring). The preamble found in the template's
   output is given to the renderer too before comparing (the cookbook's own template tests do the same).
4. BOS is compared as is: both sides must start the same way (the `llama3` renderer and the Llama 3 template
   both write `<|begin_of_text|>`; Qwen3 has none).

Not checked (the run says why): base models (no chat format of their own: the renderer is the format being
taught), tokenizers without a chat template, and the gpt-oss renderers (the template writes a dated system
message and an analysis channel the renderers leave out on purpose; the cookbook's own tests exclude it).
"""

from __future__ import annotations

import copy
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from posttrain.errors import PreflightError
from posttrain.pipeline.setup.preflight import cookbook_models

if TYPE_CHECKING:
    from tinker_cookbook import renderers

ROWS_CHECKED = 3

# The thinking switch of the template that matches each renderer (others: the template's defaults).
TEMPLATE_KWARGS: dict[str, dict[str, Any]] = {
    "qwen3": {"enable_thinking": True},
    "qwen3_disable_thinking": {"enable_thinking": False},
    "deepseekv3_thinking": {"thinking": True},
}
# Renderers whose trained turn differs from the template by design, so only the prompt form is compared:
# deepseekv3_thinking leaves the closing </think> out of the supervised turn to keep the reasoning parseable
# (the cookbook's own template tests skip its supervised form for the same reason).
PROMPT_FORM_ONLY = frozenset({"deepseekv3_thinking"})

FIXED_CONVERSATION: list[dict[str, str]] = [
    {"role": "system", "content": "You are a careful assistant."},
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "2+2 is 4."},
    {"role": "user", "content": "And 3+3?"},
    {"role": "assistant", "content": "3+3 is 6."},
]

_LLAMA3_PREAMBLE = re.compile(r"Cutting Knowledge Date: [^\n]*\nToday Date: [^\n]*\n\n")


@dataclass(frozen=True)
class Difference:
    where: str  # e.g. "training row 1, training form"
    position: int
    renderer_token: str
    template_token: str


def skip_reason(model_name: str, renderer_name: str, tokenizer: Any) -> str | None:
    """Why this model/renderer pair is not compared (None: it is)."""
    attributes = cookbook_models().get(model_name)
    if attributes is None:
        return "not a Tinker lineup model"
    if not attributes.is_chat:
        return "a base model has no chat format of its own"
    if renderer_name.startswith("gpt_oss"):
        return "gpt-oss renderers leave out the template's dated system message on purpose"
    if not getattr(tokenizer, "chat_template", None):
        return "the tokenizer has no chat template"
    return None


def conversations_from_rows(rows: Iterable[dict], limit: int = ROWS_CHECKED) -> list[list[dict]]:
    """Up to `limit` conversations from the run's rows: chat rows, RL problems, preference rows."""
    from posttrain.pipeline.envs.base import prompt_messages

    found: list[list[dict]] = []
    for row in rows:
        if len(found) >= limit:
            break
        if isinstance(row.get("messages"), list):
            found.append(row["messages"])
        elif isinstance(row.get("question"), str):
            found.append(prompt_messages(row))
        elif isinstance(row.get("prompt"), list) and row.get("chosen") is not None:
            chosen = row["chosen"]
            reply = chosen if isinstance(chosen, list) else [{"role": "assistant", "content": str(chosen)}]
            found.append([*row["prompt"], *reply])
    return found


def method_rows(method: Any) -> list[dict]:
    """The training rows a method holds (its chat data or its RL problems); empty when it has neither."""
    data = getattr(method, "data", None)
    if data is not None and getattr(data, "train", None):
        return list(data.train[:ROWS_CHECKED])
    problems = getattr(method, "problems", None)
    if problems is not None and getattr(problems, "train", None):
        return list(problems.train[:ROWS_CHECKED])
    return []


def _stripped(messages: Sequence[dict]) -> list[dict]:
    out = []
    for m in messages:
        m = dict(m)
        if isinstance(m.get("content"), str):
            m["content"] = m["content"].strip()
        out.append(m)
    return out


def _template_text(tokenizer: Any, messages: list[dict], generation: bool, kwargs: dict) -> str:
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation, **kwargs)
    if not isinstance(text, str):  # pragma: no cover - a batch answer for one conversation
        raise TypeError(f"apply_chat_template returned {type(text).__name__}")
    return text


def _with_llama3_preamble(messages: list[dict], template_text: str) -> list[dict]:
    """Rule 3: the template's dated preamble, given to the renderer's system message too."""
    match = _LLAMA3_PREAMBLE.search(template_text)
    if match is None:
        return messages
    messages = copy.deepcopy(messages)
    if messages and messages[0]["role"] == "system":
        messages[0]["content"] = match.group(0) + messages[0]["content"]
    else:
        messages.insert(0, {"role": "system", "content": match.group(0)})
    return messages


def _first_difference(ours: list[int], theirs: list[int]) -> int | None:
    for i, (a, b) in enumerate(zip(ours, theirs, strict=False)):
        if a != b:
            return i
    return None if len(ours) == len(theirs) else min(len(ours), len(theirs))


def _compare(
    renderer: renderers.Renderer,
    renderer_name: str,
    tokenizer: Any,
    messages: list[dict],
    where: str,
) -> Difference | None:
    kwargs = TEMPLATE_KWARGS.get(renderer_name, {})
    messages = _stripped(messages)
    hf_messages = [renderer.to_openai_message(m) for m in messages]
    forms: list[tuple[str, list[dict], list[dict]]] = []
    if messages and messages[-1]["role"] == "assistant" and renderer_name not in PROMPT_FORM_ONLY:
        forms.append(("training form", messages, hf_messages))
    last_user = max((i for i, m in enumerate(messages) if m["role"] == "user"), default=-1)
    if last_user >= 0:
        forms.append(("prompt form", messages[: last_user + 1], hf_messages[: last_user + 1]))

    for form, ours_msgs, hf_msgs in forms:
        generation = form == "prompt form"
        text = _template_text(tokenizer, hf_msgs, generation, kwargs)
        if renderer_name == "llama3":
            ours_msgs = _with_llama3_preamble(ours_msgs, text)
        theirs = list(tokenizer.encode(text, add_special_tokens=False))
        try:
            if generation:
                ours = renderer.build_generation_prompt(ours_msgs).to_ints()
            else:
                ours = renderer.build_supervised_example(ours_msgs)[0].to_ints()
        except Exception as exc:  # noqa: BLE001 - a renderer that cannot write the row is a mismatch too
            first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise PreflightError(
                f"renderer {renderer_name!r} cannot render {where} ({type(exc).__name__}: {first_line[:200]})"
            ) from None
        if not generation and ours and ours == theirs[: len(ours)]:
            stops = {s for s in renderer.get_stop_sequences() if isinstance(s, int)}
            if ours[-1] in stops:  # rule 1: nothing after the last trained end-of-turn token counts
                theirs = theirs[: len(ours)]
        position = _first_difference(ours, theirs)
        if position is not None:
            return Difference(
                where=f"{where}, {form}",
                position=position,
                renderer_token=_show(tokenizer, ours, position),
                template_token=_show(tokenizer, theirs, position),
            )
    return None


def _show(tokenizer: Any, tokens: list[int], position: int) -> str:
    if position >= len(tokens):
        return "(end)"
    return repr(tokenizer.decode([tokens[position]]))


def check_renderer_matches_template(
    model_name: str,
    renderer_name: str,
    renderer: renderers.Renderer,
    conversations: Sequence[list[dict]],
    recommended: str | None = None,
) -> str:
    """Raise `PreflightError` (one line) at the first token where the renderer and the template differ.

    Returns what was done, for the run's output ("checked ..." or "not checked: <why>").
    """
    tokenizer = renderer.tokenizer
    reason = skip_reason(model_name, renderer_name, tokenizer)
    if reason:
        return f"not checked against the chat template ({reason})"
    labelled = [(f"training row {i + 1}", c) for i, c in enumerate(conversations)]
    labelled.append(("a fixed two-turn conversation", FIXED_CONVERSATION))
    for where, messages in labelled:
        difference = _compare(renderer, renderer_name, tokenizer, messages, where)
        if difference is None:
            continue
        hint = ""
        if recommended and recommended != renderer_name:
            hint = f"; the cookbook recommends renderer_name={recommended} for this model"
        raise PreflightError(
            f"renderer {renderer_name!r} does not match {model_name}'s chat template on {difference.where}: "
            f"first difference at token {difference.position}: renderer {difference.renderer_token} vs "
            f"template {difference.template_token}{hint}"
        )
    thinking = TEMPLATE_KWARGS.get(renderer_name)
    mode = f", template with {', '.join(f'{k}={v}' for k, v in thinking.items())}" if thinking else ""
    return (
        f"matches {model_name}'s chat template token for token on {len(labelled)} conversations "
        f"(training and prompt forms{mode})"
    )


def check_run(ctx: Any, method: Any) -> str:
    """The run's check: its model, renderer and a few of its rows. Returns the line to show."""
    recommended = None
    try:
        from tinker_cookbook import model_info

        recommended = model_info.get_recommended_renderer_name(ctx.cfg.model_name)
    except Exception:  # noqa: BLE001 - models outside the cookbook's table
        pass
    conversations = conversations_from_rows(method_rows(method))
    result = check_renderer_matches_template(
        ctx.cfg.model_name, ctx.renderer_name, ctx.renderer, conversations, recommended
    )
    if ctx.cfg.model_name in cookbook_models():  # elsewhere (own models, the default) there is nothing to say
        ctx.say(f"renderer: {ctx.renderer_name} {result}")
    return result
