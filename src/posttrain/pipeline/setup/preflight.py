"""Checks before any compute is spent: credentials (.env), the cookbook's model table, the tokenizer, reachability.

- `load_env(dotenv_path)` loads `.env` (never overriding a variable the environment already sets to a non-empty
  value) and reports which of the three spec variables are set -- booleans, never values.
- `check_credentials(backend)`: the Tinker backend needs all of TINKER_API_KEY, WANDB_API_KEY, WANDB_PROJECT
  (the spec's rule: stop and ask for missing ones); the local engine needs none of them and gets notes instead.
- `cookbook_models()`: the pinned cookbook's model table (what a Tinker model is checked against offline; the
  check itself is `backend.check_model`).

The renderer a model is run with is chosen in `config.renderers` (the environments need it too, below this layer).
"""

from __future__ import annotations

import os
import socket
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
