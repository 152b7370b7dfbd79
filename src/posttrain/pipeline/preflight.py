"""Checks before any compute is spent: credentials (.env), model availability, renderer choice, redaction.

- `load_env(dotenv_path)` loads `.env` (never overriding a variable the environment already sets to a non-empty
  value) and reports which of the three spec variables are set -- booleans, never values.
- `check_credentials(backend)`: the Tinker backend needs all of TINKER_API_KEY, WANDB_API_KEY, WANDB_PROJECT
  (the spec's rule: stop and ask for missing ones); the local engine needs none of them and gets notes instead.
- `check_model(model_name, backend, available)`: the model must be one the backend serves.
- `resolve_renderer(model_name, renderer_name)`: explicit > cookbook recommendation > a documented fallback.
  Never loads a tokenizer (no hub access).
- `redact(text)`: removes the values of TINKER_API_KEY and WANDB_API_KEY from text before it is logged/written.
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path
from typing import Literal

from dotenv import dotenv_values, load_dotenv

from posttrain.errors import PreflightError

REQUIRED_ENV_VARS = ("TINKER_API_KEY", "WANDB_API_KEY", "WANDB_PROJECT")
SECRET_ENV_VARS = ("TINKER_API_KEY", "WANDB_API_KEY")
# Used for local-engine runs when WANDB_PROJECT is not set.
DEFAULT_LOCAL_WANDB_PROJECT = "posttrain-local"

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
        return [
            "Tinker: TINKER_API_KEY is set",
            f"W&B: online, project {os.environ['WANDB_PROJECT'].strip()!r}",
        ]

    notes = ["Tinker: local engine, TINKER_API_KEY not needed"]
    if _is_set("WANDB_API_KEY") and os.environ.get("WANDB_MODE", "").lower() not in ("offline", "disabled"):
        notes.append("W&B: online (WANDB_API_KEY is set)")
    else:
        notes.append(_wandb_offline_note())
    if _is_set("WANDB_PROJECT"):
        notes.append(f"W&B project: {os.environ['WANDB_PROJECT'].strip()!r}")
    else:
        notes.append(f"W&B: no WANDB_PROJECT, using project {DEFAULT_LOCAL_WANDB_PROJECT!r}")
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


def builtin_renderer_names() -> list[str]:
    """The renderer names `tinker_cookbook.renderers.get_renderer` dispatches on, read from its source.

    Reading the source keeps preflight fast: importing the renderers package pulls in torch (seconds).
    """
    import importlib.util

    spec = importlib.util.find_spec("tinker_cookbook.renderers")
    if spec is None or spec.origin is None:
        return []
    try:
        source = Path(spec.origin).read_text(encoding="utf-8")
    except OSError:
        return []
    return sorted(set(re.findall(r'\bname == "([A-Za-z0-9_.-]+)"', source)))


def _renderer_exists(name: str) -> bool:
    """Whether the cookbook knows the renderer name (built-in or registered), without loading a tokenizer."""
    builtin = builtin_renderer_names()
    if name in builtin:
        return True
    if builtin and "tinker_cookbook.renderers" not in sys.modules:
        return False  # custom renderers can only be registered once the package is imported
    from tinker_cookbook import renderers

    if renderers.is_renderer_registered(name):
        return True
    try:
        renderers.get_renderer(name, tokenizer=None)  # type: ignore[arg-type]
    except Exception as e:
        # Only an unknown name fails with this message; a known one fails later, on the missing tokenizer.
        return not (type(e).__name__ == "RendererError" and "Unknown renderer" in str(e))
    return True


def resolve_renderer(model_name: str, renderer_name: str | None) -> tuple[str, str]:
    """Pick the chat renderer: returns (renderer_name, source).

    source is "explicit" (given), "cookbook recommendation" (tinker_cookbook.model_info) or
    "fallback: <why>" for models outside the cookbook's table. Never touches the network.
    """
    if renderer_name:
        if not _renderer_exists(renderer_name):
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


# ------------------------------------------------------------------------------------------- redaction


def redact(text: str) -> str:
    """Replace the values of TINKER_API_KEY and WANDB_API_KEY (from os.environ) in `text` with '***'."""
    secrets = sorted(
        {v for name in SECRET_ENV_VARS if (v := os.environ.get(name, "").strip()) and len(v) >= 4},
        key=len,
        reverse=True,
    )
    for secret in secrets:
        text = text.replace(secret, "***")
    return text
