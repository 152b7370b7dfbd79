"""Session plumbing the SDK calls around the real work: client config, sessions, heartbeats, telemetry.

A finished session (the SDK's `close`) releases its training runs: see `weights.release_session`.
"""

from __future__ import annotations

import time

from fastapi import APIRouter, Request

from posttrain.engine.routes.common import API, EngineDep, json_body
from posttrain.engine.weights import release_session

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


# How long a session's finish waits for its training runs to be released (behind other sessions' queued work,
# the release then happens later all the same).
FINISH_WAIT_SECONDS = 10.0


@router.post("/sessions/{session_id}/finish")
async def finish(session_id: str, engine: EngineDep) -> dict:
    engine.sessions.pop(session_id, None)
    engine.sample_seeds.forget_session(session_id)
    if not any(run_id.startswith(f"{session_id}:") for run_id in list(engine.weights.runs)):
        return {}

    def work() -> list[str]:
        return release_session(engine.weights, session_id)

    # Adapters live on the compute thread's models, and this session's own queued requests must run first.
    future = engine.submit_training(None, work)
    await engine.futures.wait(future, FINISH_WAIT_SECONDS)
    return {}


@router.get("/healthz")
async def healthz() -> dict:
    return {"status": "ok"}
