"""Where the training runs: the Tinker service, or the local engine started for this run.

This is the pipeline's only contact with the engine package, and only to start and stop its process
(`engine.launcher`); everything else goes through the Tinker protocol like any other service.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from pathlib import Path

import tinker

from posttrain.config import TrainConfig
from posttrain.errors import PreflightError
from posttrain.pipeline import preflight

# The local engine accepts any key; the SDK insists on one being set.
LOCAL_API_KEY = "tml-local-engine"
_LOOPBACK = ("127.0.0.1", "localhost", "[::1]")


def choose_backend(cfg: TrainConfig) -> preflight.Backend:
    """backend=auto: Tinker for a remote base_url, or a key plus a lineup model; the local engine otherwise."""
    if cfg.backend != "auto":
        return cfg.backend
    if cfg.base_url and not any(host in cfg.base_url for host in _LOOPBACK):
        return "tinker"
    if os.environ.get("TINKER_API_KEY", "").strip() and cfg.model_name in preflight.TINKER_LINEUP:
        return "tinker"
    return "local"


@asynccontextmanager
async def service_url(
    cfg: TrainConfig,
    backend: preflight.Backend,
    log_path: Path,
    say: Callable[[str], None],
    extra_models: Sequence[str] = (),
) -> AsyncIterator[str | None]:
    """The service URL for the run (None: the SDK's default Tinker URL); a local engine lives as long as this.

    `extra_models`: more base models the local engine must serve besides cfg.model_name (a teacher)."""
    if backend == "tinker":
        yield cfg.base_url
        return
    os.environ.setdefault("TINKER_API_KEY", LOCAL_API_KEY)
    if cfg.base_url is not None:
        yield cfg.base_url
        return
    from posttrain.engine.launcher import EngineProcess

    models = list(dict.fromkeys([cfg.model_name, *extra_models]))
    engine = EngineProcess(models=models, dtype=cfg.dtype, log_file=log_path / "engine.log")
    say(f"engine: starting the local engine with {', '.join(models)} (log: {log_path / 'engine.log'})")
    try:
        url = await asyncio.to_thread(engine.start)
        say(f"engine: ready at {url}")
        yield url
    finally:
        engine.stop()


async def check_served_model(
    service: tinker.ServiceClient, url: str | None, model_name: str, backend: preflight.Backend
) -> None:
    """The model must be one the service serves (its capabilities; the lineup table when the cloud is silent)."""
    try:
        caps = await service.get_server_capabilities_async()
        available: list[str] | None = [m.model_name for m in caps.supported_models if m.model_name]
    except Exception as exc:  # noqa: BLE001 - the cloud may be unreachable; the lineup table is the fallback
        if backend == "local":
            raise PreflightError(
                f"the engine at {url} did not answer get_server_capabilities ({exc})"
            ) from None
        available = None
    preflight.check_model(model_name, backend, available)
