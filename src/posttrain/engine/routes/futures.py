"""retrieve_future: the long poll through which every future-returning request delivers its result."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse

from posttrain.engine.futures import PROTOBUF
from posttrain.engine.routes.common import API, EngineDep, error, json_body

router = APIRouter(prefix=API)


@router.post("/retrieve_future")
async def retrieve_future(request: Request, engine: EngineDep) -> Response:
    data = await json_body(request)
    request_id = str(data.get("request_id", ""))
    future = engine.futures.get(request_id)
    if future is None:
        return error(404, f"unknown request_id {request_id!r}")
    if not await engine.futures.wait(future):
        return JSONResponse({"type": "try_again", "request_id": request_id, "queue_state": "active"})
    if future.error is not None:
        return JSONResponse({"error": future.error, "category": future.category})
    if isinstance(future.payload, bytes):
        return Response(content=future.payload, media_type=PROTOBUF)
    return JSONResponse(future.payload)
