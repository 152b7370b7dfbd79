"""`posttrain serve-model`: a finished run's trained model (or its base model) behind OpenAI's chat-completions API.

The weights are sampled where `posttrain chat` samples them (the run's backend: a local engine started for the
server and stopped with it, or Tinker), through the run's renderer; `openai_api` is the HTTP side. The port is
taken before anything starts, so a port in use is one line at once; Ctrl-C or SIGTERM stops the server, then the
engine.
"""

from __future__ import annotations

import asyncio
import errno
import socket
from pathlib import Path

import chz

from posttrain.errors import ConfigError, UserError
from posttrain.pipeline.after.finished import FinishedRun, find_run, renderer_for, sampler_for, service_for
from posttrain.pipeline.console import CONSOLE

say = CONSOLE.say
# Requests still running when the server is told to stop get this long to finish before their connections close.
GRACEFUL_STOP_SECONDS = 5


@chz.chz
class ServeModelSettings:
    """posttrain serve-model: an OpenAI-compatible endpoint (/v1/chat/completions) for a trained run's model."""

    run_name: str | None = chz.field(default=None, doc="the run (default: the latest in results_dir)")
    results_dir: str = chz.field(default="results", doc="where the run's results are")
    port: int = chz.field(default=8000, doc="the port to listen on (0: any free port, printed at start)")
    host: str = chz.field(default="127.0.0.1", doc="the address to listen on (0.0.0.0: every interface)")
    base: bool = chz.field(default=False, doc="serve the base model the run started from instead")


def serve_model(settings: ServeModelSettings) -> None:
    if not 0 <= settings.port <= 65535:
        raise ConfigError(f"port={settings.port}: must be between 0 and 65535")
    run = find_run(settings.results_dir, settings.run_name)
    log_path = run.log_path / "serve-model"
    log_path.mkdir(parents=True, exist_ok=True)
    with listening_socket(settings.host, settings.port) as sock, CONSOLE.capture(log_path / "console.log"):
        asyncio.run(_serve(run, settings.base, sock, log_path))


def listening_socket(host: str, port: int) -> socket.socket:
    """A socket bound to host:port, handed to the server later (so nothing else can take the port meanwhile)."""
    try:
        family, kind, _, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except (socket.gaierror, UnicodeError) as exc:
        raise ConfigError(f"host={host}: not an address to listen on ({exc})") from None
    sock = socket.socket(family, kind)
    # As uvicorn binds: a port left in TIME_WAIT by a server that just stopped can be taken again at once.
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            why = f"already in use on {host}; stop what listens there, or pass another port="
            raise UserError(f"port={port}: {why}") from None
        raise UserError(f"host={host} port={port}: cannot listen there ({exc.strerror})") from None
    return sock


async def _serve(run: FinishedRun, base: bool, sock: socket.socket, log_path: Path) -> None:
    import tinker
    import uvicorn

    from posttrain.pipeline.after.openai_api import Served, create_app

    renderer = renderer_for(run)
    async with service_for(run, log_path, say) as url:
        sampler = await sampler_for(tinker.ServiceClient(base_url=url), run, base=base)
        model_id = run.model if base else run.name
        app = create_app(Served(model_id, sampler, renderer))
        # log_config=None: uvicorn's records (one per request) go through the root logger into console.log.
        config = uvicorn.Config(
            app,
            log_config=None,
            log_level="info",
            lifespan="off",
            timeout_graceful_shutdown=GRACEFUL_STOP_SECONDS,
        )
        server = uvicorn.Server(config)
        # uvicorn turns Ctrl-C and SIGTERM into a graceful stop while it serves, then raises the signal again
        # for asyncio.run, which ends this task: the engine is stopped on the way out, as after a chat.
        serving = asyncio.create_task(server.serve(sockets=[sock]))
        while not server.started and not serving.done():
            await asyncio.sleep(0.05)
        if server.started:
            weights = f"the base model {run.model}" if base else f"{run.model}, {run.sampler_path}"
            say(
                f"serve-model: run {run.name} ({weights}) at {_address(sock)}/v1 as model {model_id!r}; Ctrl-C stops"
            )
        await serving


def _address(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"
