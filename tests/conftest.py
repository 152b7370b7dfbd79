"""Shared fixtures: offline environment, a tiny random model, and a local engine serving it over loopback."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

# Tests never reach the internet: the Hub, W&B and Tinker cloud are off-limits.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["WANDB_MODE"] = "offline"
os.environ.setdefault("TINKER_API_KEY", "tml-local-test")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> str:
    from posttrain.engine.tiny import make_tiny_model

    return str(make_tiny_model(tmp_path_factory.mktemp("models") / "tiny-llama"))


@pytest.fixture(scope="session")
def engine_dirs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("engine")


@pytest.fixture(scope="session")
def engine(tiny_model: str, engine_dirs: Path) -> Iterator:
    """One engine for the session, serving the tiny model (fp32, so numeric checks are tight)."""
    from posttrain.engine.launcher import EngineProcess

    proc = EngineProcess(
        models=[tiny_model],
        checkpoint_dir=engine_dirs / "checkpoints",
        dtype="fp32",
        log_file=engine_dirs / "engine.log",
    )
    proc.start()
    yield proc
    proc.stop()


@pytest.fixture
def service(engine) -> Iterator:
    import tinker

    client = tinker.ServiceClient(base_url=engine.url, api_key="tml-local-test")
    yield client
