"""What the route modules share: the API prefix, the engine dependency, JSON bodies, and error replies."""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable
from typing import Annotated, Any

from fastapi import Depends, Request
from fastapi.responses import JSONResponse

from posttrain.engine.engine import Engine
from posttrain.engine.errors import WireError
from posttrain.engine.futures import Future
from posttrain.engine.wire import json_object

API = "/api/v1"


def get_engine(request: Request) -> Engine:
    return request.app.state.engine


EngineDep = Annotated[Engine, Depends(get_engine)]


async def json_body(request: Request) -> dict:
    return json_object(await request.body(), request.url.path)


def error(status: int, message: str) -> JSONResponse:
    # Never an empty 400: the SDK takes that for a proxy rejection and retries it.
    return JSONResponse(status_code=status, content={"detail": message, "error": message})


def future_reply(future: Future, **extra: Any) -> dict:
    return {"request_id": future.request_id, **extra}


def failed_future(engine: Engine, exc: WireError, **extra: Any) -> dict:
    """A bad request to a future-returning endpoint becomes a failed future: the SDK raises it as
    RequestFailedError with our message instead of retrying or wrapping it."""
    future, _ = engine.futures.create(None)
    future.set_error(str(exc), "user")
    return future_reply(future, **extra)


Handler = Callable[[Request, Engine], Awaitable[dict]]


def returns_failed_future(handler: Handler) -> Handler:
    """Answer a request that `handler` rejects (WireError) with a failed future rather than a 400."""

    @functools.wraps(handler)
    async def endpoint(request: Request, engine: EngineDep) -> dict:
        try:
            return await handler(request, engine)
        except WireError as exc:
            return failed_future(engine, exc)

    return endpoint
