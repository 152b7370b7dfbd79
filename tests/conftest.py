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
def tiny_model_b(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A second tiny model: same shape and tokenizer, different random weights (teacher/student tests)."""
    from posttrain.engine.tiny import make_tiny_model

    return str(make_tiny_model(tmp_path_factory.mktemp("models-b") / "tiny-llama-b", seed=1))


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


@pytest.fixture(scope="session")
def keyed_engine(tiny_model: str, tiny_model_b: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator:
    """A second engine, started only by the tests that need it: two models at once, an API key (the one in
    $TINKER_API_KEY, so cookbook loops can use it), and its own checkpoint directory. Tests may `.restart()` it,
    so read `.url` after requesting the fixture, never cache it across a restart."""
    from posttrain.engine.launcher import EngineProcess

    dirs = tmp_path_factory.mktemp("keyed-engine")
    proc = EngineProcess(
        models=[tiny_model, tiny_model_b],
        checkpoint_dir=dirs / "checkpoints",
        dtype="fp32",
        api_key=os.environ["TINKER_API_KEY"],
        log_file=dirs / "engine.log",
    )
    proc.start()
    yield proc
    proc.stop()


@pytest.fixture
def service(engine) -> Iterator:
    import tinker

    client = tinker.ServiceClient(base_url=engine.url, api_key="tml-local-test")
    yield client
