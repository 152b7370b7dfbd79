"""Which chat renderer a model runs with (`renderer_name`): the one given, the cookbook's recommendation, or a
documented fallback for models outside the cookbook's table; and the renderer of a model that answers beside the
policy (a judge, a game partner). Never loads a tokenizer (no hub access)."""

from __future__ import annotations

import sys

from posttrain.errors import PreflightError

# Model families outside the cookbook's model table whose chat template is ChatML
# (`<|im_start|>role\ncontent<|im_end|>`), which `qwen3_instruct` renders token for token (it is ChatML
# without any <think> handling); checked against SmolLM2-135M-Instruct's own chat template.
_CHATML_FAMILIES = ("smollm", "qwen2", "qwen1.5", "openhermes", "hermes-2", "tinyllama-chat")
_LLAMA3_FAMILIES = ("llama-3", "llama3")


# The renderer names tinker_cookbook 0.6.1's `renderers.get_renderer` dispatches on (a test checks each one
# against the cookbook, so a pin bump that drops one fails loudly). Listed rather than looked up because
# importing the renderers pulls in torch (seconds), and settings are checked before that.
BUILTIN_RENDERERS = (
    "deepseekv3",
    "deepseekv3_disable_thinking",
    "deepseekv3_thinking",
    "deepseekv4_1",
    "deepseekv4_1_disable_thinking",
    "deepseekv4_1_low_reasoning",
    "deepseekv4_1_max_reasoning",
    "deepseekv4_1_preserve_thinking",
    "glm5_3_high_reasoning",
    "glm5_3_low_reasoning",
    "glm5_3_max_reasoning",
    "gpt_oss_high_reasoning",
    "gpt_oss_low_reasoning",
    "gpt_oss_medium_reasoning",
    "gpt_oss_no_sysprompt",
    "kimi_k2",
    "kimi_k25",
    "kimi_k25_disable_thinking",
    "kimi_k26",
    "kimi_k26_disable_thinking",
    "kimi_k26_preserve_thinking",
    "kimi_k31_pro_disable_thinking",
    "kimi_k31_pro_high_reasoning",
    "kimi_k31_pro_low_reasoning",
    "kimi_k31_pro_max_reasoning",
    "kimi_k31_pro_no_reasoning_effort",
    "llama3",
    "nemotron3",
    "nemotron3_disable_thinking",
    "nemotron3_low_thinking",
    "nemotron3_preserve_thinking",
    "nemotron3_ultra",
    "nemotron3_ultra_disable_thinking",
    "nemotron3_ultra_medium_thinking",
    "nemotron3_ultra_preserve_thinking",
    "qwen3",
    "qwen3_5",
    "qwen3_5_disable_thinking",
    "qwen3_5_preserve_thinking",
    "qwen3_8_disable_thinking",
    "qwen3_8_low_reasoning",
    "qwen3_8_medium_reasoning",
    "qwen3_8_xhigh_reasoning",
    "qwen3_disable_thinking",
    "qwen3_instruct",
    "qwen3_vl",
    "qwen3_vl_instruct",
    "role_colon",
    "tml_v0",
)


def renderer_exists(name: str) -> bool:
    """A built-in renderer, or one registered through the cookbook's public `register_renderer`."""
    if name in BUILTIN_RENDERERS:
        return True
    if "tinker_cookbook.renderers" not in sys.modules:
        return False  # nothing can have been registered before the package is imported
    from tinker_cookbook import renderers

    return renderers.is_renderer_registered(name)


def resolve_renderer(model_name: str, renderer_name: str | None) -> tuple[str, str]:
    """Pick the chat renderer: returns (renderer_name, source).

    source is "explicit" (given), "cookbook recommendation" (tinker_cookbook.model_info) or
    "fallback: <why>" for models outside the cookbook's table. Never touches the network.
    """
    if renderer_name:
        if not renderer_exists(renderer_name):
            raise PreflightError(
                f"renderer_name={renderer_name!r} is not a tinker-cookbook renderer "
                "(e.g. llama3, qwen3, qwen3_instruct, role_colon, deepseekv3, gpt_oss_medium_reasoning, kimi_k2)"
            )
        return renderer_name, "explicit"

    from tinker_cookbook import model_info

    try:
        return model_info.get_recommended_renderer_name(model_name), "cookbook recommendation"
    except Exception:
        pass

    lowered = model_name.lower()
    if any(f in lowered for f in _CHATML_FAMILIES):
        return "qwen3_instruct", (
            "fallback: not in the cookbook's model table; its chat template is ChatML "
            "(<|im_start|>role ... <|im_end|>), which qwen3_instruct renders token for token"
        )
    if any(f in lowered for f in _LLAMA3_FAMILIES):
        return "llama3", "fallback: not in the cookbook's model table; Llama 3 chat format by name"
    return "role_colon", (
        "fallback: not in the cookbook's model table and chat template unknown; role_colon is the "
        "cookbook's generic 'User: ... Assistant: ...' format (set renderer_name to override)"
    )


def answering_renderer(model_name: str, policy: tuple[str, str], why: str | None) -> tuple[str, str]:
    """The renderer of a model that answers beside the policy (a judge, a game partner): the policy's own when it
    is the policy's model (`policy` = (model, renderer)), else its recommended one; with thinking off where the
    family has such a renderer and `why` says why (None: thinking stays as it is). Returns (renderer, source)."""
    if model_name == policy[0]:
        renderer, source = policy[1], "the policy's"
    else:
        renderer, source = resolve_renderer(model_name, None)
    if why is not None and renderer_exists(f"{renderer}_disable_thinking"):
        renderer, source = f"{renderer}_disable_thinking", f"{source}, thinking off: {why}"
    return renderer, source
