"""The REST side: server capabilities, training runs, checkpoints and weights info."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response

from posttrain.engine.checkpoints import parse_tinker_path
from posttrain.engine.routes.common import API, EngineDep, error, json_body

router = APIRouter(prefix=API)


@router.get("/get_server_capabilities")
async def capabilities(engine: EngineDep) -> dict:
    return {
        "supported_models": [
            {
                "model_name": name,
                "max_context_length": m.max_context,
                "trainable": True,
                "sampleable": True,
            }
            for name, m in engine.weights.models.items()
        ]
    }


@router.get("/training_runs")
async def list_training_runs(engine: EngineDep, limit: int = 20, offset: int = 0) -> dict:
    ids = engine.weights.run_ids()
    page = [engine.weights.training_run_view(r) for r in ids[offset : offset + limit]]
    return {"training_runs": page, "cursor": {"offset": offset, "limit": limit, "total_count": len(ids)}}


@router.get("/training_runs/{run_id}")
async def get_training_run(run_id: str, engine: EngineDep) -> dict:
    return engine.weights.training_run_view(run_id)


@router.get("/training_runs/{run_id}/checkpoints")
async def list_checkpoints(run_id: str, engine: EngineDep) -> dict:
    return {"checkpoints": engine.weights.store.list(run_id)}


@router.get("/checkpoints")
async def list_user_checkpoints(engine: EngineDep, limit: int = 100, offset: int = 0) -> dict:
    everything = [c for r in engine.weights.run_ids() for c in engine.weights.store.list(r)]
    everything.sort(key=lambda c: c["time"], reverse=True)
    return {
        "checkpoints": everything[offset : offset + limit],
        "cursor": {"offset": offset, "limit": limit, "total_count": len(everything)},
    }


@router.delete("/training_runs/{run_id}/checkpoints/{kind}/{name}")
async def delete_checkpoint(run_id: str, kind: str, name: str, engine: EngineDep) -> Response:
    ref = parse_tinker_path(f"tinker://{run_id}/{kind}/{name}")
    if not engine.weights.store.delete(ref):
        return error(404, f"checkpoint {ref.tinker_path} not found")
    return Response(status_code=204)


@router.post("/weights_info")
async def weights_info(request: Request, engine: EngineDep) -> dict:
    data = await json_body(request)
    ref = parse_tinker_path(str(data.get("tinker_path") or ""))
    meta = engine.weights.store.meta(ref)
    lora = meta["lora"]
    return {
        "base_model": meta["base_model"],
        "is_lora": True,
        "lora_rank": lora["rank"],
        "train_unembed": lora.get("train_unembed"),
        "train_mlp": lora.get("train_mlp"),
        "train_attn": lora.get("train_attn"),
    }
