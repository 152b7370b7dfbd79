"""Where the training runs: the Tinker service, or the local engine started for this run.

This is the pipeline's only contact with the engine package, and only to start and stop its process
(`engine.launcher`); everything else goes through the Tinker protocol like any other service.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
import threading
import warnings
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from posttrain.config.run import RunSettings
from posttrain.errors import PreflightError, UserError
from posttrain.pipeline.setup import preflight
from posttrain.util import short_error

if TYPE_CHECKING:
    from posttrain.engine.launcher import EngineProcess

# The local engine accepts any key; the SDK insists on one being set.
LOCAL_API_KEY = "tml-local-engine"
_LOOPBACK = ("127.0.0.1", "localhost", "[::1]")
ENGINE_POLL_SECONDS = 1.0
# How long the run has to notice an interrupt before it gets another one.
ENGINE_ACK_SECONDS = 3.0


def choose_backend(cfg: RunSettings) -> preflight.Backend:
    """backend=auto: Tinker for a remote base_url, or a key plus a lineup model; the local engine otherwise.

    A lineup model this machine has no copy of (not a directory, not the bundled model, not in the Hugging Face
    cache) with no TINKER_API_KEY stops the run: the user's document says to stop and ask for missing keys, and
    going on would download and train a multi-billion-parameter model on this machine's CPU."""
    if cfg.backend != "auto":
        return cfg.backend
    if cfg.base_url and not any(host in cfg.base_url for host in _LOOPBACK):
        return "tinker"
    if preflight.is_cookbook_model(cfg.model_name):
        if os.environ.get("TINKER_API_KEY", "").strip():
            return "tinker"
        if cfg.base_url is None and not has_local_copy(cfg.model_name):
            missing = [k for k in preflight.REQUIRED_ENV_VARS if not os.environ.get(k, "").strip()]
            raise PreflightError(
                f"model_name={cfg.model_name} trains on the Tinker service: Missing required environment "
                f"variables: {', '.join(missing)} (set them in .env in {Path.cwd()} and run again; to train it on "
                "this machine instead, on purpose, pass backend=local)"
            )
    return "local"


def has_local_copy(model_name: str) -> bool:
    """Whether the local engine can load `model_name` without downloading it: a directory, the bundled default
    model, or a model already in the Hugging Face cache."""
    if Path(model_name).expanduser().is_dir() or model_name == RunSettings().model_name:
        return True
    from huggingface_hub import try_to_load_from_cache

    return isinstance(try_to_load_from_cache(model_name, "config.json"), str)


def remote_url(cfg: RunSettings, backend: preflight.Backend) -> str | None:
    """The URL of a service this run does not start itself (None for a local engine started by the run)."""
    if backend == "tinker" and cfg.base_url is None:
        from tinker.lib.base_url import resolve_base_url

        return str(resolve_base_url(None))
    return cfg.base_url


def check_local_model(cfg: RunSettings) -> None:
    """Before the engine starts: a model it will serve must be a directory, the default model, or (with the
    Hub out of reach) already in the Hugging Face cache. Otherwise the engine would fail after its start-up."""
    if cfg.base_url is not None or has_local_copy(cfg.model_name):
        return
    if os.environ.get("HF_HUB_OFFLINE", "").lower() not in ("1", "true", "yes"):
        return  # the engine downloads it from the Hub
    raise PreflightError(
        f"model_name={cfg.model_name}: not a local directory and not in the Hugging Face cache, and the Hub "
        "cannot be reached; pass a model directory or use the default model"
    )


class EngineDied(UserError):
    """The local engine this run started exited part-way."""


@asynccontextmanager
async def service_url(
    cfg: RunSettings,
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
    from posttrain.engine.launcher import EngineProcess, ServeOptions

    models = list(dict.fromkeys([cfg.model_name, *extra_models]))
    log_file = log_path / "engine.log"
    engine = EngineProcess(ServeOptions(models=models, dtype=cfg.dtype), log_file=log_file)
    say(f"engine: starting the local engine with {', '.join(models)} (log: {log_file})")
    try:
        engine.spawn()  # from this (the main) thread: the engine is told to stop if this process dies
        url = await asyncio.to_thread(engine.wait_ready)
        say(f"engine: ready at {url}")
        # The SDK retries a dead server for minutes; the run should stop as soon as the engine is gone.
        watcher = _EngineWatcher(engine)
        try:
            yield url
        except (asyncio.CancelledError, KeyboardInterrupt):
            if watcher.exit_code is not None:
                watcher.acknowledged.set()
                task = asyncio.current_task()
                if task is not None:
                    task.uncancel()
                raise EngineDied(
                    f"the local engine stopped during the run (exit code {watcher.exit_code}); see {log_file}"
                ) from None
            raise
        finally:
            watcher.stop()
    finally:
        engine.stop()


class _EngineWatcher:
    """A thread that interrupts the run when the engine process exits.

    A thread, not an asyncio task: some SDK and cookbook calls block the event loop while they retry (seen: 6
    minutes inside create_lora_training_client after the engine died). It interrupts the way Ctrl-C does
    (SIGINT: asyncio cancels the run; again, while the run has not noticed, raises KeyboardInterrupt inside a
    blocking call), and `service_url` turns that into `EngineDied`.
    """

    def __init__(self, engine: EngineProcess):
        self.engine = engine
        self.exit_code: int | None = None
        self.acknowledged = threading.Event()
        self._stopped = threading.Event()
        threading.Thread(target=self._watch, name="engine-watcher", daemon=True).start()

    def _watch(self) -> None:
        while not self._stopped.wait(ENGINE_POLL_SECONDS):
            code = self.engine.proc.poll() if self.engine.proc else None
            if code is None:
                continue
            self.exit_code = code
            for _ in range(5):
                if self._stopped.is_set() or self.acknowledged.is_set():
                    return
                os.kill(os.getpid(), signal.SIGINT)
                self.acknowledged.wait(ENGINE_ACK_SECONDS)
            return

    def stop(self) -> None:
        self._stopped.set()


# How long the service has to list its models before the run stops (the connection was checked already).
CAPABILITIES_TIMEOUT_SECONDS = 30.0


def check_model(model_name: str, backend: preflight.Backend, available: list[str] | None) -> None:
    """Raise `PreflightError` unless `backend` can train `model_name`.

    tinker: the model must be in `available` (the service's own list) when the service answered; with
    `available=None` (the service could not be asked) in the pinned cookbook's model table.
    local: the model must be in `available` (what the engine serves); with `available=None` there is nothing
    to check against and the engine itself is the judge.
    """
    if backend == "tinker":
        pool = list(available) if available is not None else list(preflight.cookbook_models())
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


def _cookbook_table_name() -> str:
    from importlib import metadata

    version = metadata.version("tinker-cookbook")
    return f"tinker-cookbook {version}'s model table (the Tinker service could not be asked for its list)"


def service_models(url: str | None) -> list[str]:
    """The models the service at `url` (None: the SDK's default Tinker URL) offers: its own
    `get_server_capabilities` list. Raises `PreflightError` (one line) when it does not answer."""
    import tinker

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            rest = tinker.RestClient(base_url=url)
            caps = rest.get_server_capabilities().result(timeout=CAPABILITIES_TIMEOUT_SECONDS)
    except Exception as exc:  # noqa: BLE001 - refused key, timeout, an older server: one line, no traceback
        where = url or "the Tinker service"
        raise PreflightError(
            f"{where} did not list its models (get_server_capabilities: {short_error(exc)})"
        ) from None
    return [m.model_name for m in caps.supported_models if m.model_name]


def check_served_models(url: str | None, names: Sequence[str], backend: preflight.Backend) -> None:
    """Every model the run needs (the one it trains, a teacher, a grader) must be one the service offers."""
    available = service_models(url)
    for name in dict.fromkeys(names):
        check_model(name, backend, available)


def check_models(cfg: RunSettings, backend: preflight.Backend, models: list[str]) -> str | None:
    """Every model the run needs, where it will run: a service the run does not start must answer and offer each;
    a local engine the run starts must be able to load it. A Tinker plan needs no service: offline, the models
    are checked against the cookbook's table and the reason is returned as a warning."""
    url = remote_url(cfg, backend)
    if url is None:
        if backend == "local":
            check_local_model(cfg)
        return None
    warning, available = None, None
    try:
        preflight.check_reachable(url)
        available = service_models(cfg.base_url)
    except PreflightError as exc:
        if not (getattr(cfg, "dry_run", False) and backend == "tinker"):
            raise
        warning = str(exc)
    for name in dict.fromkeys(models):
        check_model(name, backend, available)
    return warning


def refused(exc: BaseException, log_file: Path) -> UserError | None:
    """A request the service (Tinker or the engine) refused, as one line; its traceback goes to `log_file` (the
    run's console.log). None when `exc` is not the SDK's."""
    tinker = sys.modules.get("tinker")
    if tinker is None or not isinstance(exc, tinker.TinkerError):
        return None
    logging.getLogger(__name__).error("the service refused a request", exc_info=exc)
    message = (
        short_error(exc, 400, with_type=False)
        .split(" for self.request_id=", 1)[0]
        .removeprefix("Request failed: ")
    )
    return UserError(f"the service refused a request: {message} (the full error: {log_file})")
