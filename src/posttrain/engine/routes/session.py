"""Session plumbing the SDK calls around the real work: client config, sessions, heartbeats, telemetry."""

from __future__ import annotations

import time

from fastapi import APIRouter, Request

from posttrain.engine.routes.common import API, EngineDep, json_body

router = APIRouter(prefix=API)


@router.post("/client/config")
async def client_config() -> dict:
    return {"pjwt_auth_enabled": False}


@router.post("/client/dynamic_config")
async def dynamic_config() -> dict:
    return {"refresh_interval_sec": 300, "sample_cancel_enabled": False}


@router.post("/create_session")
async def create_session(request: Request, engine: EngineDep) -> dict:
    data = await json_body(request)
    return {"session_id": engine.new_session(data.get("tags", []))}


@router.post("/session_heartbeat")
async def heartbeat(request: Request, engine: EngineDep) -> dict:
    data = await json_body(request)
    session = engine.sessions.get(data.get("session_id", ""))
    if session is not None:
        session["last"] = time.time()
    return {}


@router.post("/telemetry")
async def telemetry() -> dict:
    return {"status": "accepted"}


@router.post("/sessions/{session_id}/finish")
async def finish(session_id: str, engine: EngineDep) -> dict:
    engine.sessions.pop(session_id, None)
    return {}


@router.get("/healthz")
async def healthz() -> dict:
    return {"status": "ok"}
