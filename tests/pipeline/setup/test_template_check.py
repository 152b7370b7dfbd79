"""The renderer/template check on the real Qwen3 and Llama 3 tokenizers: the cookbook's recommended renderers
match, the documented conventions pass, and wrong renderers are refused at the first differing token."""

from __future__ import annotations

from pathlib import Path

import pytest

from posttrain.errors import PreflightError
from posttrain.pipeline.setup.template_check import check_renderer_matches_template, conversations_from_rows

QWEN, LLAMA = "Qwen/Qwen3-8B", "meta-llama/Llama-3.1-8B-Instruct"

ROWS = [
    [{"role": "user", "content": "Say the number 3."}, {"role": "assistant", "content": "Number 3. Done."}],
    [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4\n"},  # trailing whitespace: Llama 3's template trims it
    ],
    [{"role": "user", "content": "What is 7*6?\nGive only the final answer after ####."}],  # an RL prompt
]
THINKING_ROW = [
    {"role": "user", "content": "Q?"},
    {"role": "assistant", "content": "<think>\nhmm\n</think>\n\nA."},
]


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    from lineup_models import unpack_tokenizer
    from transformers import AutoTokenizer

    root = tmp_path_factory.mktemp("tokenizers")
    return {
        QWEN: AutoTokenizer.from_pretrained(unpack_tokenizer("qwen3", root / "qwen3")),
        LLAMA: AutoTokenizer.from_pretrained(unpack_tokenizer("llama3", root / "llama3")),
    }


def check(tokenizer, model: str, renderer_name: str, rows=ROWS, recommended: str | None = None) -> str:
    from tinker_cookbook.renderers import get_renderer

    renderer = get_renderer(renderer_name, tokenizer=tokenizer)
    return check_renderer_matches_template(model, renderer_name, renderer, rows, recommended)


@pytest.mark.parametrize(
    ("model", "renderer_name", "needle"),
    [
        (QWEN, "qwen3", "enable_thinking=True"),
        (QWEN, "qwen3_disable_thinking", "enable_thinking=False"),
        (LLAMA, "llama3", "training and prompt forms"),
    ],
)
def test_recommended_renderers_match_the_real_templates(tokenizers, model, renderer_name, needle) -> None:
    note = check(tokenizers[model], model, renderer_name)
    assert "token for token on 4 conversations" in note and needle in note


def test_qwen3_thinking_rows_match_with_thinking_on(tokenizers) -> None:
    assert "token for token" in check(tokenizers[QWEN], QWEN, "qwen3", rows=[THINKING_ROW])
    with pytest.raises(PreflightError, match="cannot render training row 1"):
        check(tokenizers[QWEN], QWEN, "qwen3_disable_thinking", rows=[THINKING_ROW])


@pytest.mark.parametrize(
    ("model", "renderer_name", "position", "ours", "theirs"),
    [
        # The subtle one: the 2507-Instruct renderer on the hybrid model leaves out the empty think block.
        (QWEN, "qwen3_instruct", 14, "'Number'", "'<think>'"),
        (QWEN, "llama3", 0, "'<'", "'<|im_start|>'"),
        (QWEN, "role_colon", 0, "'User'", "'<|im_start|>'"),
        (LLAMA, "role_colon", 1, "'User'", "'<|start_header_id|>'"),  # both write BOS
    ],
)
def test_wrong_renderer_is_refused_at_the_first_differing_token(
    tokenizers, model, renderer_name, position, ours, theirs
) -> None:
    with pytest.raises(PreflightError) as info:
        check(tokenizers[model], model, renderer_name, recommended="qwen3" if model == QWEN else "llama3")
    message = str(info.value)
    assert len(message.splitlines()) == 1
    assert f"renderer {renderer_name!r} does not match {model}'s chat template on training row 1" in message
    assert f"first difference at token {position}:" in message and f"template {theirs}" in message
    assert f"renderer {ours} vs" in message
    assert "the cookbook recommends renderer_name=" in message


def test_a_renderer_that_cannot_write_the_rows_is_refused(tokenizers) -> None:
    with pytest.raises(
        PreflightError, match=r"^renderer 'qwen3' cannot render training row 1 \(AssertionError"
    ):
        check(tokenizers[LLAMA], LLAMA, "qwen3")  # <|im_end|> is not one token in Llama 3's vocabulary


def test_llama31_date_preamble_is_a_convention(tokenizers) -> None:
    """Llama 3.1's template writes 'Cutting Knowledge Date...' into the system turn; the llama3 renderer does not."""
    tokenizer = tokenizers[LLAMA]
    original = tokenizer.chat_template
    preamble = "Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n"
    tokenizer.chat_template = (
        "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{% set sys = messages[0]['content'] | trim %}"
        "{% set rest = messages[1:] %}{% else %}{% set sys = '' %}{% set rest = messages %}{% endif %}"
        "{{ '<|start_header_id|>system<|end_header_id|>\\n\\n" + preamble.replace("\n", "\\n") + "' + sys + "
        "'<|eot_id|>' }}{% for m in rest %}{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\\n\\n' + "
        "m['content'] | trim + '<|eot_id|>' }}{% endfor %}{% if add_generation_prompt %}"
        "{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
    )
    try:
        assert "token for token" in check(tokenizer, LLAMA, "llama3")
        # Anything else in the system turn is still a difference.
        tokenizer.chat_template = tokenizer.chat_template.replace("Today Date", "Today is")
        with pytest.raises(PreflightError, match="first difference at token"):
            check(tokenizer, LLAMA, "llama3")
    finally:
        tokenizer.chat_template = original


def test_not_checked_where_there_is_no_chat_format(tokenizers) -> None:
    assert "base model" in check(tokenizers[LLAMA], "meta-llama/Llama-3.1-8B", "role_colon")
    assert "not a Tinker lineup model" in check(tokenizers[QWEN], "my/own-model", "role_colon")
    assert "gpt-oss" in check(tokenizers[QWEN], "openai/gpt-oss-20b", "gpt_oss_no_sysprompt")


def test_rows_of_every_kind_become_conversations() -> None:
    rows = [
        {"messages": ROWS[0]},
        {"question": "What is 1+1?", "answer": "2"},
        {"prompt": [{"role": "user", "content": "Pick"}], "chosen": "A", "rejected": "B"},
        {"messages": ROWS[1]},
    ]
    conversations = conversations_from_rows(rows)
    assert len(conversations) == 3
    assert conversations[1][0]["content"].startswith("What is 1+1?\n")
    assert conversations[2][-1] == {"role": "assistant", "content": "A"}


def test_vendored_tokenizers_are_the_npm_files(tmp_path: Path) -> None:
    import hashlib

    from lineup_models import unpack_tokenizer

    expected = {
        "qwen3": "aeb13307a71acd8fe81861d94ad54ab689df773318809eed3cbe794b4492dae4",
        "llama3": "c05a3c2174e9edd5be19dc5a0748c42a9037bec2811ce062728bfd71f8702d78",
        "gptoss": "0614fe83cadab421296e664e1f48f4261fa8fef6e03e63bb75c20f38e37d07d3",
    }
    for family, digest in expected.items():
        directory = unpack_tokenizer(family, tmp_path / family)
        assert hashlib.sha256((directory / "tokenizer.json").read_bytes()).hexdigest() == digest
