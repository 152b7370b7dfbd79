"""Checks before any compute is spent: credentials (.env), model availability, renderer choice, redaction.

- `load_env(dotenv_path)` loads `.env` (never overriding a variable the environment already sets to a non-empty
  value) and reports which of the three spec variables are set -- booleans, never values.
- `check_credentials(backend)`: the Tinker backend needs all of TINKER_API_KEY, WANDB_API_KEY, WANDB_PROJECT
  (the spec's rule: stop and ask for missing ones); the local engine needs none of them and gets notes instead.
- `check_model(model_name, backend, available)`: the model must be one the backend serves.
- `resolve_renderer(model_name, renderer_name)`: explicit > cookbook recommendation > a documented fallback.
  Never loads a tokenizer (no hub access).
"""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

from dotenv import dotenv_values, load_dotenv

from posttrain.errors import PreflightError
from posttrain.pipeline.tracking import DEFAULT_WANDB_PROJECT

REQUIRED_ENV_VARS = ("TINKER_API_KEY", "WANDB_API_KEY", "WANDB_PROJECT")

# The spec's "Supported Models" table (the Tinker model lineup): model name -> type.
TINKER_LINEUP: dict[str, str] = {
    "Qwen/Qwen3-VL-235B-A22B-Instruct": "Vision",
    "Qwen/Qwen3-VL-30B-A3B-Instruct": "Vision",
    "Qwen/Qwen3-235B-A22B-Instruct-2507": "Instruction",
    "Qwen/Qwen3-30B-A3B-Instruct-2507": "Instruction",
    "Qwen/Qwen3-30B-A3B": "Hybrid",
    "Qwen/Qwen3-30B-A3B-Base": "Base",
    "Qwen/Qwen3-32B": "Hybrid",
    "Qwen/Qwen3-8B": "Hybrid",
    "Qwen/Qwen3-8B-Base": "Base",
    "Qwen/Qwen3-4B-Instruct-2507": "Instruction",
    "openai/gpt-oss-120b": "Reasoning",
    "openai/gpt-oss-20b": "Reasoning",
    "deepseek-ai/DeepSeek-V3.1": "Hybrid",
    "deepseek-ai/DeepSeek-V3.1-Base": "Base",
    "meta-llama/Llama-3.1-70B": "Base",
    "meta-llama/Llama-3.3-70B-Instruct": "Instruction",
    "meta-llama/Llama-3.1-8B": "Base",
    "meta-llama/Llama-3.1-8B-Instruct": "Instruction",
    "meta-llama/Llama-3.2-3B": "Base",
    "meta-llama/Llama-3.2-1B": "Base",
    "moonshotai/Kimi-K2-Thinking": "Reasoning",
}

Backend = Literal["tinker", "local"]


# ------------------------------------------------------------------------------------------- credentials


def _is_set(name: str) -> bool:
    return bool(os.environ.get(name, "").strip())


def load_env(dotenv_path: str | Path = ".env") -> dict[str, bool]:
    """Load `dotenv_path` into os.environ and return which required variables are set (bools only).

    A variable already set (non-empty) in the environment wins over the file; one that is set but empty is
    filled from the file (an empty value counts as missing). A missing file is not an error: the result then
    reflects the environment alone.
    """
    path = Path(dotenv_path)
    if path.is_file():
        load_dotenv(path, override=False)
        for key, value in dotenv_values(path).items():
            if value and key in os.environ and not os.environ[key].strip():
                os.environ[key] = value
    return {name: _is_set(name) for name in REQUIRED_ENV_VARS}


def _wandb_offline_note() -> str:
    wandb_dir = os.environ.get("WANDB_DIR") or "<log dir>"
    return (
        "W&B: no WANDB_API_KEY, tracking runs in W&B offline mode "
        f"(files under {wandb_dir}/wandb/offline-run-*; sync later with `wandb sync <that dir>`)"
    )


def check_credentials(backend: Backend) -> list[str]:
    """Check the environment for what `backend` needs; return human-readable notes.

    tinker: TINKER_API_KEY, WANDB_API_KEY and WANDB_PROJECT must all be set, else `PreflightError` naming the
    missing ones (names only, never values). local: nothing is required; the notes say what is used instead.
    """
    if backend not in ("tinker", "local"):
        raise ValueError(f"backend must be 'tinker' or 'local', got {backend!r}")
    missing = [name for name in REQUIRED_ENV_VARS if not _is_set(name)]
    if backend == "tinker":
        if missing:
            raise PreflightError(
                f"Missing required environment variables: {', '.join(missing)} "
                f"(set them in .env in {Path.cwd()})"
            )
        project = os.environ["WANDB_PROJECT"].strip()
        if os.environ.get("WANDB_MODE", "").strip().lower() in ("offline", "disabled", "dryrun"):
            wandb_note = f"W&B: offline (WANDB_MODE={os.environ['WANDB_MODE'].strip()}), project {project!r}"
        else:
            wandb_note = f"W&B: online, project {project!r}"
        return ["Tinker: TINKER_API_KEY is set", wandb_note]

    notes = ["Tinker: local engine, TINKER_API_KEY not needed"]
    if _is_set("WANDB_API_KEY") and os.environ.get("WANDB_MODE", "").lower() not in ("offline", "disabled"):
        notes.append("W&B: online (WANDB_API_KEY is set)")
    else:
        notes.append(_wandb_offline_note())
    if _is_set("WANDB_PROJECT"):
        notes.append(f"W&B project: {os.environ['WANDB_PROJECT'].strip()!r}")
    else:
        notes.append(f"W&B: no WANDB_PROJECT, using project {DEFAULT_WANDB_PROJECT!r}")
    return notes


# ------------------------------------------------------------------------------------------------ models


def check_model(model_name: str, backend: Backend, available: list[str] | None) -> None:
    """Raise `PreflightError` unless `backend` can train `model_name`.

    tinker: the model must be in `available` (the service's capabilities) when given, else in TINKER_LINEUP.
    local: the model must be in `available` (what the engine serves); with `available=None` there is nothing
    to check against and the engine itself is the judge.
    """
    if backend == "tinker":
        pool = list(available) if available is not None else list(TINKER_LINEUP)
        source = "the Tinker service" if available is not None else "the Tinker model lineup"
    elif backend == "local":
        if available is None:
            return
        pool = list(available)
        source = "the local engine"
    else:
        raise ValueError(f"backend must be 'tinker' or 'local', got {backend!r}")
    if model_name in pool:
        return
    listed = ", ".join(pool) if pool else "(none)"
    hint = ""
    if backend == "tinker" and model_name not in TINKER_LINEUP:
        hint = " (or use backend=local for models outside the Tinker lineup)"
    raise PreflightError(f"Model {model_name!r} is not available on {source}{hint}. Available: {listed}")


# --------------------------------------------------------------------------------------------- renderers

# Model families outside the cookbook's model table whose chat template is ChatML
# (`<|im_start|>role\ncontent<|im_end|>`), which `qwen3_instruct` renders token for token (it is ChatML
# without any <think> handling); checked against SmolLM2-135M-Instruct's own chat template.
_CHATML_FAMILIES = ("smollm", "qwen2", "qwen1.5", "openhermes", "hermes-2", "tinyllama-chat")
_LLAMA3_FAMILIES = ("llama-3", "llama3")


# The renderer names tinker_cookbook 0.5.8's `renderers.get_renderer` dispatches on (a test checks each one
# against the cookbook, so a pin bump that drops one fails loudly). Listed rather than looked up because
# importing the renderers pulls in torch (seconds), and settings are checked before that.
BUILTIN_RENDERERS = (
    "deepseekv3", "deepseekv3_disable_thinking", "deepseekv3_thinking", "deepseekv4_1",
    "deepseekv4_1_disable_thinking", "deepseekv4_1_low_reasoning", "deepseekv4_1_max_reasoning",
    "deepseekv4_1_preserve_thinking", "glm5_3_high_reasoning", "glm5_3_low_reasoning", "glm5_3_max_reasoning",
    "gpt_oss_high_reasoning", "gpt_oss_low_reasoning", "gpt_oss_medium_reasoning", "gpt_oss_no_sysprompt",
    "kimi_k2", "kimi_k25", "kimi_k25_disable_thinking", "kimi_k26", "kimi_k26_disable_thinking",
    "kimi_k26_preserve_thinking", "llama3", "nemotron3", "nemotron3_disable_thinking", "nemotron3_low_thinking",
    "nemotron3_preserve_thinking", "nemotron3_ultra", "nemotron3_ultra_disable_thinking",
    "nemotron3_ultra_medium_thinking", "nemotron3_ultra_preserve_thinking", "qwen3", "qwen3_5",
    "qwen3_5_disable_thinking", "qwen3_5_preserve_thinking", "qwen3_8_disable_thinking", "qwen3_8_low_reasoning",
    "qwen3_8_medium_reasoning", "qwen3_8_xhigh_reasoning", "qwen3_disable_thinking", "qwen3_instruct", "qwen3_vl",
    "qwen3_vl_instruct", "role_colon", "tml_v0",
)  # fmt: skip


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


# ------------------------------------------------------------------------------------------- reachability

REACHABILITY_TIMEOUT_SECONDS = 10.0


def check_reachable(url: str, timeout: float = REACHABILITY_TIMEOUT_SECONDS) -> None:
    """Raise `PreflightError` naming `url` unless something accepts a connection there within `timeout`.

    The SDK retries an unreachable service for minutes; a run should say so in seconds, before it spends.
    """
    parts = urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        with socket.create_connection((parts.hostname or "", port), timeout=timeout):
            return
    except OSError as exc:
        reason = "timed out" if isinstance(exc, TimeoutError) else (exc.strerror or type(exc).__name__)
        raise PreflightError(
            f"the Tinker service at {url} cannot be reached ({reason}); check base_url, the network, "
            "or run locally with backend=local"
        ) from None
