"""Checks before any compute is spent: credentials (.env), model availability, renderer choice, redaction.

- `load_env(dotenv_path)` loads `.env` (never overriding a variable the environment already sets to a non-empty
  value) and reports which of the three spec variables are set -- booleans, never values.
- `check_credentials(backend)`: the Tinker backend needs all of TINKER_API_KEY, WANDB_API_KEY, WANDB_PROJECT
  (the spec's rule: stop and ask for missing ones); the local engine needs none of them and gets notes instead.
- `check_model(model_name, backend, available)`: the model must be one the backend serves (the service's own
  list; offline, the pinned cookbook's model table).
- `resolve_renderer(model_name, renderer_name)`: explicit > cookbook recommendation > a documented fallback.
  Never loads a tokenizer (no hub access).
"""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from dotenv import dotenv_values, load_dotenv

from posttrain.errors import PreflightError
from posttrain.pipeline.tracking import DEFAULT_WANDB_PROJECT
from posttrain.util import short_error

REQUIRED_ENV_VARS = ("TINKER_API_KEY", "WANDB_API_KEY", "WANDB_PROJECT")

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


# Where the list of models comes from when the service itself cannot be asked: the pinned cookbook's model table
# (`tinker_cookbook.model_info`, the models it has renderers and hyperparameters for). The service's own list
# (`get_server_capabilities`) always wins when it can be reached: models retire and arrive between cookbook
# releases (2026-06: every Llama, Qwen3-32B, ...; added: Qwen3.5/3.6/3.8, Nemotron 3, Kimi-K2.6).
_TABLE_FAMILIES = (
    "get_qwen_info",
    "get_llama_info",
    "get_deepseek_info",
    "get_gpt_oss_info",
    "get_moonshot_info",
    "get_zai_info",
    "get_nvidia_info",
    "get_thinkingmachines_info",
)


def cookbook_models() -> dict[str, Any]:
    """Every model of the pinned cookbook's model table, by full name, with its `ModelAttributes`."""
    from tinker_cookbook import model_info

    table: dict[str, Any] = {}
    for family in _TABLE_FAMILIES:
        for version, attributes in getattr(model_info, family)().items():
            table[f"{attributes.organization}/{version}"] = attributes
    return table


def is_cookbook_model(model_name: str) -> bool:
    """Whether the pinned cookbook's model table lists `model_name` (the Tinker models it knows)."""
    return model_name in cookbook_models()


def check_model(model_name: str, backend: Backend, available: list[str] | None) -> None:
    """Raise `PreflightError` unless `backend` can train `model_name`.

    tinker: the model must be in `available` (the service's own list) when the service answered; with
    `available=None` (the service could not be asked) in the pinned cookbook's model table.
    local: the model must be in `available` (what the engine serves); with `available=None` there is nothing
    to check against and the engine itself is the judge.
    """
    if backend == "tinker":
        pool = list(available) if available is not None else list(cookbook_models())
        source = "the Tinker service" if available is not None else _cookbook_table_name()
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
    hint = " (or use backend=local for a model of your own)" if backend == "tinker" else ""
    raise PreflightError(f"Model {model_name!r} is not available on {source}{hint}. Available: {listed}")


def load_tokenizer(model_name: str) -> Any:
    """The model's tokenizer, as the cookbook loads it (its registry, a local directory, the Hugging Face cache or
    Hub; tml-renderers for Inkling and Kimi-K3.1). A tokenizer that cannot be had is one line, not a traceback."""
    from tinker_cookbook.tokenizer_utils import get_tokenizer

    try:
        return get_tokenizer(model_name)
    except Exception as exc:  # noqa: BLE001 - offline and not cached, a gated repo, a missing tml-renderers class
        raise PreflightError(
            f"model_name={model_name}: its tokenizer cannot be loaded ({short_error(exc, 240)}); token counts, "
            "the renderer and every request need it"
        ) from None


def _cookbook_table_name() -> str:
    from importlib import metadata

    version = metadata.version("tinker-cookbook")
    return f"tinker-cookbook {version}'s model table (the Tinker service could not be asked for its list)"


# --------------------------------------------------------------------------------------------- renderers

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
