"""Sampling: sampling sessions and asample (queued, and batched with other samples of the same weights)."""

from __future__ import annotations

from fastapi import APIRouter, Request

from posttrain.engine.engine import Engine
from posttrain.engine.errors import WireError
from posttrain.engine.routes.common import API, EngineDep, failed_future, future_reply, json_body
from posttrain.engine.wire import SampleRequest, SamplerRequest, sequence_id

router = APIRouter(prefix=API)


@router.post("/create_sampling_session")
async def create_sampling_session(request: Request, engine: EngineDep) -> dict:
    req = SamplerRequest.from_json(await json_body(request))
    engine.weights.create_sampler(req.new_sampler_id, req.base_model, req.model_path)
    return {"type": "create_sampling_session", "sampling_session_id": req.new_sampler_id}


@router.get("/samplers/{sampler_id}")
async def get_sampler(sampler_id: str, engine: EngineDep) -> dict:
    sampler = engine.weights.samplers.get(sampler_id)
    if sampler is None:
        raise KeyError(f"sampler {sampler_id}")
    return {"sampler_id": sampler_id, "base_model": sampler.base.name, "model_path": sampler.model_path}


@router.post("/asample")
async def asample(request: Request, engine: EngineDep) -> dict:
    req = SampleRequest.from_json(await json_body(request))
    try:
        return _submit_sample(engine, req)
    except WireError as exc:
        return failed_future(engine, exc, sample_sequence_ids=req.failed_sequence_ids())


def _submit_sample(engine: Engine, req: SampleRequest) -> dict:
    weights = req.weights
    if weights.sampling_session_id:
        sampler = engine.weights.samplers.get(weights.sampling_session_id)
        if sampler is None:
            raise WireError(f"unknown sampling_session_id {weights.sampling_session_id!r}")
    else:
        sampler = engine.weights.create_sampler(
            weights.adhoc_sampler_id, weights.base_model, weights.model_path
        )
    gen = req.generation(sampler.base)
    # Without a seq_id a request cannot be recognised as a retry: it always gets a fresh future.
    key = ("sample", sampler.sampler_id, req.seq_id) if req.seq_id is not None else None
    future, _ = engine.submit_sample(key, sampler, gen)
    ids = [sequence_id(future.request_id, i) for i in range(gen.num_samples)]
    return future_reply(future, sample_sequence_ids=ids)
