"""Training clients: create_model, get_info, forward(_backward), optim_step, and saving (also for download) and
loading weights.

Each future-returning request is queued on the engine's compute thread. Its idempotency key makes a retried
POST (same seq_id) get the original future back instead of running twice.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import Any

from fastapi import APIRouter, Request

from posttrain.engine.checkpoints import check_name, parse_tinker_path
from posttrain.engine.engine import Engine
from posttrain.engine.routes.common import (
    API,
    EngineDep,
    error,
    future_reply,
    json_body,
    returns_failed_future,
)
from posttrain.engine.runtime import LoraSpec
from posttrain.engine.wire import (
    CreateModelRequest,
    LoadWeightsRequest,
    OptimStepRequest,
    SaveWeightsRequest,
    WireError,
    forward_backward_request,
    training_model_id,
)

router = APIRouter(prefix=API)


def _submit(engine: Engine, model_id: str, seq_id: Any, work: Callable[[], Any]) -> dict:
    """Queue `work` for the training run `model_id`; answer with its future."""
    # Without a seq_id a request cannot be recognised as a retry: it always gets a fresh future.
    key = ("train", model_id, seq_id) if seq_id else None
    return future_reply(engine.submit_training(key, work), model_id=model_id)


@router.post("/create_model")
@returns_failed_future
async def create_model(request: Request, engine: EngineDep) -> dict:
    req = CreateModelRequest.from_json(await json_body(request))
    spec = LoraSpec.from_dict(req.lora_config)
    if spec.seed is None:  # a seeded session (engine/seeding.py) makes the initialisation reproducible
        spec = replace(spec, seed=engine.lora_seed(req.session_id, req.model_seq_id))

    def work() -> dict:
        engine.weights.create_run(req.model_id, req.base_model, spec, req.user_metadata)
        return {"model_id": req.model_id, "type": "create_model"}

    future = engine.submit_training(("create_model", req.session_id, req.model_seq_id), work)
    return future_reply(future, model_id=req.model_id)


@router.post("/get_info")
async def get_info(request: Request, engine: EngineDep) -> dict:
    data = await json_body(request)
    model_id = data.get("model_id", "")
    if model_id not in engine.weights.runs:
        return error(404, f"unknown model_id {model_id!r}")  # type: ignore[return-value]
    run = engine.weights.runs[model_id]
    return {
        "type": "get_info",
        "model_id": model_id,
        "model_data": {"model_name": run.base.name, "tokenizer_id": str(run.base.path), "arch": "lora"},
        "is_lora": True,
        "lora_rank": run.spec.rank,
        "model_name": run.base.name,
    }


@router.post("/forward_backward")
@router.post("/forward")  # the SDK >= 0.25 sends forward as forward_only here
@returns_failed_future
async def forward_backward(request: Request, engine: EngineDep) -> dict:
    fb = forward_backward_request(
        await request.body(), request.headers.get("content-type", ""), request.headers.get("content-encoding")
    )
    engine.weights.run(fb.model_id)
    return _submit(engine, fb.model_id, fb.seq_id, lambda: engine.weights.forward_backward(fb))


@router.post("/optim_step")
@returns_failed_future
async def optim_step(request: Request, engine: EngineDep) -> dict:
    req = OptimStepRequest.from_json(await json_body(request))
    engine.weights.run(req.model_id)
    if req.optimizer != "adam":
        raise WireError("optim_step: only Adam is available (send adam_params)")
    return _submit(
        engine, req.model_id, req.seq_id, lambda: engine.weights.optim_step(req.model_id, req.adam_params)
    )


@router.post("/save_weights")
@returns_failed_future
async def save_weights(request: Request, engine: EngineDep) -> dict:
    req = SaveWeightsRequest.from_json(await json_body(request))
    engine.weights.run(req.model_id)
    name = check_name(str(req.path or ""))
    return _submit(
        engine,
        req.model_id,
        req.seq_id,
        lambda: engine.weights.save_state(
            req.model_id, name, req.ttl_seconds, req.overwrite, req.user_metadata
        ),
    )


@router.post("/save_weights_for_sampler")
@returns_failed_future
async def save_weights_for_sampler(request: Request, engine: EngineDep) -> dict:
    req = SaveWeightsRequest.from_json(await json_body(request))
    engine.weights.run(req.model_id)
    if req.path is not None:
        check_name(str(req.path))
    return _submit(
        engine,
        req.model_id,
        req.seq_id,
        lambda: engine.weights.save_for_sampler(
            req.model_id, req.path, req.sampling_session_seq_id, req.ttl_seconds, req.user_metadata
        ),
    )


@router.post("/save_weights_external")
@returns_failed_future
async def save_weights_external(request: Request, engine: EngineDep) -> dict:
    data = await json_body(request)
    model_id = str(data.get("model_id", ""))
    engine.weights.run(model_id)
    name = check_name(str(data.get("path") or ""))
    recipients = data.get("age_encryption_recipients")
    if recipients is not None and not (isinstance(recipients, list) and 0 < len(recipients) <= 10):
        raise WireError("age_encryption_recipients: give 1 to 10 public keys")
    return _submit(
        engine,
        model_id,
        data.get("seq_id"),
        lambda: engine.weights.save_external(
            model_id, name, data.get("ttl_seconds"), recipients, data.get("user_metadata")
        ),
    )


@router.post("/load_weights")
@returns_failed_future
async def load_weights(request: Request, engine: EngineDep) -> dict:
    req = LoadWeightsRequest.from_json(await json_body(request))
    parse_tinker_path(req.path)
    if req.model_id:
        model_id = req.model_id
        engine.weights.run(model_id)
        key: tuple = ("train", model_id, req.seq_id)
    else:
        # Create-from-state: the SDK derives the model id itself, so it must be exactly this.
        model_id = training_model_id(req.session_id, req.model_seq_id)
        key = ("create_model", req.session_id, req.model_seq_id)
    future = engine.submit_training(
        key, lambda: engine.weights.load(model_id, req.path, req.optimizer, req.base_model, req.user_metadata)
    )
    return future_reply(future, model_id=model_id)
