"""Decide once, at start-up, whether the Hugging Face Hub is reachable.

huggingface_hub retries an unreachable host for over a minute per file before it falls back to its cache, and
it reads HF_HUB_OFFLINE when it is imported; so this runs before transformers/datasets are imported.
"""

import os
import socket


def hub_offline_if_unreachable(host: str = "huggingface.co", timeout: float = 3.0) -> bool:
    """Set HF_HUB_OFFLINE=1 (and the datasets twin) when the Hub cannot be reached; True if offline."""
    if os.environ.get("HF_HUB_OFFLINE") in {"1", "true", "TRUE", "yes"}:
        os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
        return True
    try:
        with socket.create_connection((host, 443), timeout=timeout):
            return False
    except OSError:
        os.environ["HF_HUB_OFFLINE"] = "1"
        os.environ["HF_DATASETS_OFFLINE"] = "1"
        return True
