"""Shared fixtures: offline environment, a tiny random model, and a local engine serving it over loopback."""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

# Tests never reach the internet: the Hub, W&B and Tinker cloud are off-limits.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["WANDB_MODE"] = "offline"
os.environ.setdefault("TINKER_API_KEY", "tml-local-test")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The cookbook's loops (>= 0.6) fetch Tinker's published price table at start; through a closed local port instead,
# so that no test, nor any process it starts, sends a request off this machine. Loopback goes direct.
for _proxy in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy"):
    os.environ[_proxy] = "http://127.0.0.1:9"
os.environ["NO_PROXY"] = os.environ["no_proxy"] = "127.0.0.1,localhost,::1"
# One test worker per processor, each starting engines: one compute thread per engine keeps them from
# oversubscribing the processors (an engine's default is every processor; the count is fixed either way).
os.environ.setdefault("POSTTRAIN_ENGINE_THREADS", "1")


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> str:
    from posttrain.engine.tiny import make_tiny_model

    return str(make_tiny_model(tmp_path_factory.mktemp("models") / "tiny-llama"))


@pytest.fixture(scope="session")
def tiny_model_b(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A second tiny model: same shape and tokenizer, different random weights (teacher/student tests)."""
    from posttrain.engine.tiny import make_tiny_model

    return str(make_tiny_model(tmp_path_factory.mktemp("models-b") / "tiny-llama-b", seed=1))


@contextlib.contextmanager
def serving(models: list[str], folder: Path, api_key: str | None = None) -> Iterator:
    """A local engine serving `models` (fp32, so numeric checks are tight), its checkpoints and log in `folder`,
    stopped when the block ends."""
    from posttrain.engine.launcher import EngineProcess, ServeOptions

    options = ServeOptions(
        models=models, checkpoint_dir=folder / "checkpoints", dtype="fp32", api_key=api_key
    )
    proc = EngineProcess(options, log_file=folder / "engine.log")
    proc.start()
    try:
        yield proc
    finally:
        proc.stop()


@pytest.fixture(scope="session")
def engine_dirs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("engine")


@pytest.fixture(scope="session")
def engine(tiny_model: str, engine_dirs: Path) -> Iterator:
    """One engine for the session, serving the tiny model."""
    with serving([tiny_model], engine_dirs) as proc:
        yield proc


@pytest.fixture(scope="session")
def keyed_engine(tiny_model: str, tiny_model_b: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator:
    """A second engine, started only by the tests that need it: two models at once, an API key (the one in
    $TINKER_API_KEY, so cookbook loops can use it), and its own checkpoint directory. Tests may `.restart()` it,
    so read `.url` after requesting the fixture, never cache it across a restart."""
    with serving(
        [tiny_model, tiny_model_b], tmp_path_factory.mktemp("keyed-engine"), os.environ["TINKER_API_KEY"]
    ) as proc:
        yield proc


def finish(client: Any) -> None:
    """End a ServiceClient's session: an open client's heartbeat thread outlives its test, and once the engine
    it talks to has stopped it logs "Session heartbeat failed" for the rest of the pytest session."""
    with contextlib.suppress(Exception):  # an engine already gone: the local heartbeat still stops
        client.close("success").result(timeout=10)


@pytest.fixture
def services() -> Iterator[Callable[..., Any]]:
    """`services(base_url=...)` opens a tinker.ServiceClient that is finished when the test ends."""
    import tinker

    opened: list[Any] = []

    def open_client(**kwargs: Any) -> Any:
        opened.append(tinker.ServiceClient(**kwargs))
        return opened[-1]

    yield open_client
    for client in opened:
        finish(client)


@pytest.fixture
def service(engine, services) -> Any:
    return services(base_url=engine.url, api_key="tml-local-test")


# ------------------------------------------------------------------ stand-ins for Tinker lineup models


@pytest.fixture(scope="session")
def lineup_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Lineup name -> a tiny random model of that family with its real tokenizer (tests/lineup_models.py)."""
    from lineup_models import LINEUP_STANDINS, make_lineup_model

    root = tmp_path_factory.mktemp("lineup-models")
    return {name: make_lineup_model(family, root / family) for name, family in LINEUP_STANDINS.items()}


@pytest.fixture(scope="session")
def lineup_hub_cache(lineup_models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An HF hub cache (for HF_HUB_CACHE) in which the cookbook's get_tokenizer(lineup name) finds them offline."""
    from lineup_models import link_tokenizers

    hub = tmp_path_factory.mktemp("lineup-hub")
    link_tokenizers(hub, lineup_models)
    return hub


# Built at run time so the cookbook's code.diff of uncommitted source never holds the whole string.
LINEUP_API_KEY = "-".join(("tml", "fake", "lineup", "key", "789"))


@pytest.fixture(scope="session")
def lineup_engine(lineup_models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator:
    """The local engine serving the stand-ins under their exact lineup names, behind an API key (the .env one)."""
    models = [f"{name}={path}" for name, path in lineup_models.items()]
    with serving(models, tmp_path_factory.mktemp("lineup-engine"), LINEUP_API_KEY) as proc:
        yield proc


# ------------------------------------------------------------------ a vision-language stand-in


@pytest.fixture(scope="session")
def vision_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Lineup name -> a tiny random vision-language model of its architecture (tests/lineup_models.py)."""
    from lineup_models import VISION_STANDINS, make_vision_model

    root = tmp_path_factory.mktemp("vision-models")
    return {name: make_vision_model(kind, root / kind) for name, kind in VISION_STANDINS.items()}


@pytest.fixture(scope="session")
def vision_hub_cache(vision_models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An HF hub cache in which the cookbook's get_tokenizer and get_image_processor(lineup name) find them."""
    from lineup_models import link_tokenizers

    hub = tmp_path_factory.mktemp("vision-hub")
    link_tokenizers(hub, vision_models)
    return hub


@pytest.fixture(scope="session")
def vision_engine(
    vision_models: dict[str, Path], tiny_model: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator:
    """The local engine serving the vision stand-ins under their lineup names (fp32), and the tiny text model
    (to check that a text-only model refuses images)."""
    models = [*(f"{name}={path}" for name, path in vision_models.items()), tiny_model]
    with serving(models, tmp_path_factory.mktemp("vision-engine")) as proc:
        yield proc


# ------------------------------------------------------------------ a finished run (tests/pipeline/after)


@pytest.fixture(scope="session")
def finished(tmp_path_factory: pytest.TempPathFactory, tiny_model: str) -> tuple[Path, dict[str, str]]:
    """A finished SFT run of the tiny model (fp32, so the comparisons are tight), its own checkpoint cache."""
    from runs import FINISHED, train

    cwd = tmp_path_factory.mktemp("after")
    env = {"POSTTRAIN_CACHE": str(cwd / "cache")}
    data = cwd / "pairs.jsonl"
    data.write_text(
        "".join(
            json.dumps({"prompt": f"Say the number {i}.", "completion": f"Number {i}. Done."}) + "\n"
            for i in range(40)
        )
    )
    # lr 0.01 over 8 steps of 4: the model moves well beyond the tolerances (at 0.05 over 4 steps of 8 the loss
    # diverged once in CI). Any verdict will do: 4 held-out examples rarely tell "improved" from "inconclusive".
    args = [
        f"dataset={data}",
        f"model_name={tiny_model}",
        "renderer_name=role_colon",
        "learning_rate=0.01",
        "batch_size=4",
        "max_steps=8",
        "save_every=0",
        "eval_every=0",
        "run_name=done",
        "backend=local",
        "lora_rank=8",
        "dtype=fp32",
    ]
    proc = train(args, cwd, extra_env=env)
    assert proc.returncode in FINISHED, proc.stdout[-2000:] + proc.stderr[-2000:]
    return cwd, env


@pytest.fixture(scope="session")
def run_engine(finished, tiny_model: str) -> Iterator[Any]:
    """A second engine on the run's checkpoint folder, to check what the commands produced against."""
    import tinker

    from posttrain.engine.launcher import EngineProcess, ServeOptions

    cwd, _ = finished
    engine = EngineProcess(
        ServeOptions(models=[tiny_model], checkpoint_dir=cwd / "cache" / "checkpoints", dtype="fp32"),
        log_file=cwd / "verify-engine.log",
    )
    engine.start()
    service = tinker.ServiceClient(base_url=engine.url, api_key="tml-local-test")
    yield service
    finish(service)
    engine.stop()


@pytest.fixture(scope="session")
def engine_answer(run_engine, tiny_model: str) -> Callable[..., str]:
    """`engine_answer(model_path, messages, max_tokens=12)`: the answer the engine itself gives `messages` at
    temperature 0 (model_path None: the base model), rendered as the run renders them."""
    import tinker
    from tinker_cookbook import renderers
    from tinker_cookbook.tokenizer_utils import get_tokenizer

    renderer = renderers.get_renderer("role_colon", tokenizer=get_tokenizer(tiny_model))

    def answer(model_path: str | None, messages: list[dict], max_tokens: int = 12) -> str:
        params = tinker.SamplingParams(
            max_tokens=max_tokens, temperature=0.0, stop=renderer.get_stop_sequences()
        )
        sampler = run_engine.create_sampling_client(
            model_path=model_path, base_model=None if model_path else tiny_model
        ).result()
        prompt = renderer.build_generation_prompt(messages)
        reply = sampler.sample(prompt, num_samples=1, sampling_params=params).result()
        return renderers.get_text_content(renderer.parse_response(reply.sequences[0].tokens)[0])

    return answer
