"""HTTP routes of the Tinker wire protocol (`/api/v1/...`), as the tinker SDK 0.38 calls them."""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse

from posttrain.engine.checkpoints import CheckpointRef, check_name, parse_tinker_path
from posttrain.engine.engine import Engine
from posttrain.engine.futures import PROTOBUF
from posttrain.engine.runtime import LoraSpec
from posttrain.engine.wire import WireError, decode_forward_backward, tokens_from_model_input

logger = logging.getLogger(__name__)
API = "/api/v1"


def _error(status: int, message: str) -> JSONResponse:
    # Never an empty 400: the SDK takes that for a proxy rejection and retries it.
    return JSONResponse(status_code=status, content={"detail": message, "error": message})


def _future_reply(future: Any, **extra: Any) -> dict:
    return {"request_id": future.request_id, **extra}


def create_app(
    engine: Engine, api_key: str | None = None, on_ready: Callable[[], None] | None = None
) -> FastAPI:
    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await engine.start()
        if on_ready is not None:
            on_ready()
        try:
            yield
        finally:
            await engine.stop()

    app = FastAPI(title="posttrain local engine", docs_url=None, redoc_url=None, lifespan=lifespan)

    def failed(exc: WireError, **extra: Any) -> dict:
        # A bad request to a future-returning endpoint becomes a failed future: the SDK raises it as
        # RequestFailedError with our message instead of retrying or wrapping it.
        future, _ = engine.futures.create(None)
        future.set_error(str(exc), "user")
        return _future_reply(future, **extra)

    def returns_failed_future(
        handler: Callable[[Request], Awaitable[dict]],
    ) -> Callable[[Request], Awaitable[dict]]:
        @functools.wraps(handler)
        async def endpoint(request: Request) -> dict:
            try:
                return await handler(request)
            except WireError as exc:
                return failed(exc)

        return endpoint

    @app.middleware("http")
    async def _auth_and_errors(request: Request, call_next):  # type: ignore[no-untyped-def]
        if api_key is not None and request.headers.get("x-api-key") != api_key:
            return _error(401, "missing or wrong X-API-Key for this engine (it was started with --api-key)")
        try:
            return await call_next(request)
        except WireError as exc:
            return _error(400, str(exc))
        except KeyError as exc:
            return _error(404, f"not found: {exc.args[0] if exc.args else exc}")
        except Exception as exc:  # noqa: BLE001 - keep serving whatever a request does
            logger.exception("unhandled error on %s", request.url.path)
            return _error(500, f"internal error in the local engine: {type(exc).__name__}: {exc}")

    async def body(request: Request) -> dict:
        try:
            data = await request.json()
        except ValueError:
            raise WireError(f"{request.url.path}: body is not JSON") from None
        if not isinstance(data, dict):
            raise WireError(f"{request.url.path}: body must be a JSON object")
        return data

    # session plumbing ---------------------------------------------------------------------------------------
    @app.post(f"{API}/client/config")
    async def client_config() -> dict:
        return {"pjwt_auth_enabled": False}

    @app.post(f"{API}/client/dynamic_config")
    async def dynamic_config() -> dict:
        return {"refresh_interval_sec": 300, "sample_cancel_enabled": False}

    @app.post(f"{API}/create_session")
    async def create_session(request: Request) -> dict:
        return {"session_id": engine.new_session(await body(request))}

    @app.post(f"{API}/session_heartbeat")
    async def heartbeat(request: Request) -> dict:
        data = await body(request)
        session = engine.sessions.get(data.get("session_id", ""))
        if session is not None:
            import time

            session["last"] = time.time()
        return {}

    @app.post(f"{API}/telemetry")
    async def telemetry() -> dict:
        return {"status": "accepted"}

    @app.post(f"{API}/sessions/{{session_id}}/finish")
    async def finish(session_id: str) -> dict:
        engine.sessions.pop(session_id, None)
        return {}

    @app.get(f"{API}/healthz")
    async def healthz() -> dict:
        return {"status": "ok"}

    @app.get(f"{API}/get_server_capabilities")
    async def capabilities() -> dict:
        return {
            "supported_models": [
                {
                    "model_name": name,
                    "max_context_length": m.max_context,
                    "trainable": True,
                    "sampleable": True,
                }
                for name, m in engine.models.items()
            ]
        }

    # training -------------------------------------------------------------------------------------------------
    @app.post(f"{API}/create_model")
    @returns_failed_future
    async def create_model(request: Request) -> dict:
        data = await body(request)
        session_id = data.get("session_id", "")
        seq = data.get("model_seq_id", 0)
        model_id = f"{session_id}:train:{seq}"
        lora = data.get("lora_config") or {}
        if "rank" not in lora:
            raise WireError("create_model: lora_config.rank is required")
        spec = LoraSpec.from_dict(lora)
        base_model = data.get("base_model")

        def work() -> dict:
            engine.create_run(model_id, base_model, spec, data.get("user_metadata"))
            return {"model_id": model_id, "type": "create_model"}

        future = engine.submit_training(("create_model", session_id, seq), work)
        return _future_reply(future, model_id=model_id)

    @app.post(f"{API}/get_info")
    async def get_info(request: Request) -> dict:
        data = await body(request)
        model_id = data.get("model_id", "")
        if model_id not in engine.runs:
            return _error(404, f"unknown model_id {model_id!r}")  # type: ignore[return-value]
        run = engine.runs[model_id]
        return {
            "type": "get_info",
            "model_id": model_id,
            "model_data": {"model_name": run.base.name, "tokenizer_id": str(run.base.path), "arch": "lora"},
            "is_lora": True,
            "lora_rank": run.spec.rank,
            "model_name": run.base.name,
        }

    @app.post(f"{API}/forward_backward")
    @returns_failed_future
    async def forward_backward(request: Request) -> dict:
        raw = await request.body()
        if "protobuf" in request.headers.get("content-type", ""):
            fb = decode_forward_backward(raw, request.headers.get("content-encoding"))
        else:
            raise WireError("forward_backward: expected an application/x-protobuf body (tinker SDK >= 0.25)")
        engine.run(fb.model_id)
        key = ("train", fb.model_id, fb.seq_id) if fb.seq_id else None
        future = engine.submit_training(key, lambda: engine.do_forward_backward(fb))
        return _future_reply(future, model_id=fb.model_id)

    @app.post(f"{API}/forward")
    async def forward(request: Request) -> dict:
        return await forward_backward(request)  # the SDK >= 0.25 sends forward as forward_only here

    @app.post(f"{API}/optim_step")
    @returns_failed_future
    async def optim_step(request: Request) -> dict:
        data = await body(request)
        model_id = data.get("model_id", "")
        engine.run(model_id)
        if "adam_params" not in data:
            raise WireError("optim_step: only Adam is available (send adam_params)")
        key = ("train", model_id, data.get("seq_id")) if data.get("seq_id") else None
        future = engine.submit_training(key, lambda: engine.do_optim_step(model_id, data["adam_params"]))
        return _future_reply(future, model_id=model_id)

    @app.post(f"{API}/save_weights")
    @returns_failed_future
    async def save_weights(request: Request) -> dict:
        data = await body(request)
        model_id = data.get("model_id", "")
        engine.run(model_id)
        name = check_name(str(data.get("path") or ""))
        key = ("train", model_id, data.get("seq_id")) if data.get("seq_id") else None
        future = engine.submit_training(
            key,
            lambda: engine.do_save_state(
                model_id,
                name,
                data.get("ttl_seconds"),
                bool(data.get("overwrite")),
                data.get("user_metadata"),
            ),
        )
        return _future_reply(future, model_id=model_id)

    @app.post(f"{API}/save_weights_for_sampler")
    @returns_failed_future
    async def save_weights_for_sampler(request: Request) -> dict:
        data = await body(request)
        model_id = data.get("model_id", "")
        engine.run(model_id)
        name = data.get("path")
        if name is not None:
            check_name(str(name))
        key = ("train", model_id, data.get("seq_id")) if data.get("seq_id") else None
        future = engine.submit_training(
            key,
            lambda: engine.do_save_for_sampler(
                model_id,
                name,
                data.get("sampling_session_seq_id"),
                data.get("ttl_seconds"),
                data.get("user_metadata"),
            ),
        )
        return _future_reply(future, model_id=model_id)

    @app.post(f"{API}/load_weights")
    @returns_failed_future
    async def load_weights(request: Request) -> dict:
        data = await body(request)
        path = str(data.get("path") or "")
        parse_tinker_path(path)
        if data.get("model_id"):
            model_id = data["model_id"]
            engine.run(model_id)
            key: tuple = ("train", model_id, data.get("seq_id"))
        else:
            # Create-from-state: the SDK derives the model id itself, so it must be exactly this.
            model_id = f"{data.get('session_id', '')}:train:{data.get('model_seq_id', 0)}"
            key = ("create_model", data.get("session_id", ""), data.get("model_seq_id", 0))
        future = engine.submit_training(
            key,
            lambda: engine.do_load(
                model_id, path, bool(data.get("optimizer")), data.get("base_model"), data.get("user_metadata")
            ),
        )
        return _future_reply(future, model_id=model_id)

    # sampling -------------------------------------------------------------------------------------------------
    @app.post(f"{API}/create_sampling_session")
    async def create_sampling_session(request: Request) -> dict:
        data = await body(request)
        sampler_id = f"{data.get('session_id', '')}:sample:{data.get('sampling_session_seq_id', 0)}"
        engine.create_sampler(sampler_id, data.get("base_model"), data.get("model_path"))
        return {"type": "create_sampling_session", "sampling_session_id": sampler_id}

    @app.get(f"{API}/samplers/{{sampler_id}}")
    async def get_sampler(sampler_id: str) -> dict:
        sampler = engine.samplers.get(sampler_id)
        if sampler is None:
            raise KeyError(f"sampler {sampler_id}")
        return {"sampler_id": sampler_id, "base_model": sampler.base.name, "model_path": sampler.model_path}

    @app.post(f"{API}/asample")
    async def asample(request: Request) -> dict:
        data = await body(request)
        try:
            return await _asample(data)
        except WireError as exc:
            return failed(
                exc, sample_sequence_ids=[f"failed:{i}" for i in range(int(data.get("num_samples") or 1))]
            )

    async def _asample(data: dict) -> dict:
        sampler_id = data.get("sampling_session_id")
        if sampler_id:
            sampler = engine.samplers.get(sampler_id)
            if sampler is None:
                raise WireError(f"unknown sampling_session_id {sampler_id!r}")
        else:
            sampler = engine.create_sampler(
                f"adhoc:{data.get('base_model')}:{data.get('model_path')}",
                data.get("base_model"),
                data.get("model_path"),
            )
        prompt = tokens_from_model_input(data.get("prompt") or {})
        gen = engine.generation_request(sampler, data, prompt)
        # Without a seq_id a request cannot be recognised as a retry: it always gets a fresh future.
        key = ("sample", sampler.sampler_id, data.get("seq_id")) if data.get("seq_id") is not None else None
        future, _ = engine.submit_sample(key, sampler, gen)
        ids = [f"{future.request_id}:{i}" for i in range(gen.num_samples)]
        return _future_reply(future, sample_sequence_ids=ids)

    @app.post(f"{API}/retrieve_future")
    async def retrieve_future(request: Request) -> Response:
        data = await body(request)
        request_id = str(data.get("request_id", ""))
        future = engine.futures.get(request_id)
        if future is None:
            return _error(404, f"unknown request_id {request_id!r}")
        if not await engine.futures.wait(future):
            return JSONResponse({"type": "try_again", "request_id": request_id, "queue_state": "active"})
        if future.error is not None:
            return JSONResponse({"error": future.error, "category": future.category})
        if isinstance(future.payload, bytes):
            return Response(content=future.payload, media_type=PROTOBUF)
        return JSONResponse(future.payload)

    # REST ------------------------------------------------------------------------------------------------------
    @app.get(f"{API}/training_runs")
    async def list_training_runs(limit: int = 20, offset: int = 0) -> dict:
        ids = engine.run_ids()
        page = [engine.training_run_view(r) for r in ids[offset : offset + limit]]
        return {"training_runs": page, "cursor": {"offset": offset, "limit": limit, "total_count": len(ids)}}

    @app.get(f"{API}/training_runs/{{run_id}}")
    async def get_training_run(run_id: str) -> dict:
        return engine.training_run_view(run_id)

    @app.get(f"{API}/training_runs/{{run_id}}/checkpoints")
    async def list_checkpoints(run_id: str) -> dict:
        return {"checkpoints": engine.store.list(run_id)}

    @app.get(f"{API}/checkpoints")
    async def list_user_checkpoints(limit: int = 100, offset: int = 0) -> dict:
        everything = [c for r in engine.run_ids() for c in engine.store.list(r)]
        everything.sort(key=lambda c: c["time"], reverse=True)
        return {
            "checkpoints": everything[offset : offset + limit],
            "cursor": {"offset": offset, "limit": limit, "total_count": len(everything)},
        }

    @app.delete(f"{API}/training_runs/{{run_id}}/checkpoints/{{kind}}/{{name}}")
    async def delete_checkpoint(run_id: str, kind: str, name: str) -> Response:
        ref = parse_tinker_path(f"tinker://{run_id}/{kind}/{name}")
        if not engine.store.delete(CheckpointRef(ref.run_id, ref.kind, ref.name)):
            return _error(404, f"checkpoint {ref.tinker_path} not found")
        return Response(status_code=204)

    @app.post(f"{API}/weights_info")
    async def weights_info(request: Request) -> dict:
        data = await body(request)
        ref = parse_tinker_path(str(data.get("tinker_path") or ""))
        meta = engine.store.meta(ref)
        lora = meta["lora"]
        return {
            "base_model": meta["base_model"],
            "is_lora": True,
            "lora_rank": lora["rank"],
            "train_unembed": lora.get("train_unembed"),
            "train_mlp": lora.get("train_mlp"),
            "train_attn": lora.get("train_attn"),
        }

    return app
