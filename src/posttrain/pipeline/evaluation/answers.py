"""What each model now says: its greedy answer to a held-out conversation, beside the NLL of the reference.

NLL says how likely the reference reply is; it does not show what the trained model writes. So an SFT run also
samples each model's greedy reply to the first ANSWERED_ROWS held-out prompts (the conversation up to its last
assistant turn), into the rows' `answer` and report.html. Bounded: at most MAX_ANSWER_TOKENS tokens each, twice
the longest reference reply where that is shorter.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from posttrain.pipeline.evaluation.common import bounded_gather
from posttrain.util import short_error

if TYPE_CHECKING:
    import tinker
    from tinker_cookbook import renderers

ANSWERED_ROWS = 64
MAX_ANSWER_TOKENS = 128


def answer_budget(renderer: renderers.Renderer, rows: Sequence[dict]) -> int:
    """Tokens per greedy answer: twice the longest reference reply (at least 16), at most MAX_ANSWER_TOKENS."""
    tokenizer = renderer.tokenizer
    longest = max((len(tokenizer.encode(_reference(r))) for r in rows[:ANSWERED_ROWS]), default=0)
    return max(16, min(MAX_ANSWER_TOKENS, 2 * longest))


def _reference(row: dict) -> str:
    reply = [m for m in row["messages"] if m["role"] == "assistant"][-1]["content"]
    return reply if isinstance(reply, str) else str(reply)


async def greedy_answers(
    client: tinker.SamplingClient,
    renderer: renderers.Renderer,
    rows: Sequence[dict],
    max_tokens: int,
    concurrency: int,
    desc: str,
) -> list[str]:
    """The greedy reply of `client` to each of the first ANSWERED_ROWS rows' prompts ('(sampling failed: ...)'
    where one failed: the NLL beside it stands)."""
    import tinker
    from tinker_cookbook import renderers as cookbook_renderers

    params = tinker.SamplingParams(max_tokens=max_tokens, temperature=0.0, stop=renderer.get_stop_sequences())

    async def one(_: int, row: dict) -> str:
        messages = row["messages"]
        last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
        try:
            prompt = renderer.build_generation_prompt(messages[:last])
            response = await client.sample(prompt, num_samples=1, sampling_params=params)
            message, _ = renderer.parse_response(response.sequences[0].tokens)
            return cookbook_renderers.get_text_content(message)
        except Exception as exc:  # noqa: BLE001 - one bad sample must not stop the evaluation
            return f"(sampling failed: {short_error(exc)})"

    return await bounded_gather(list(rows[:ANSWERED_ROWS]), one, concurrency, f"{desc}: answers")
