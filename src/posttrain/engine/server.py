"""The FastAPI app of the local engine: the routes of `engine.routes`, behind one auth and error middleware."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Callable

from fastapi import FastAPI, Request

from posttrain.engine.engine import Engine, internal_error
from posttrain.engine.errors import WireError
from posttrain.engine.routes import exports, futures, rest, sampling, session, training
from posttrain.engine.routes.common import error

logger = logging.getLogger(__name__)


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
    app.state.engine = engine

    @app.middleware("http")
    async def _auth_and_errors(request: Request, call_next):  # type: ignore[no-untyped-def]
        signed = request.url.path.startswith(exports.FILES_PATH)  # a signed download URL is its own key
        if api_key is not None and not signed and request.headers.get("x-api-key") != api_key:
            return error(401, "missing or wrong X-API-Key for this engine (it was started with --api-key)")
        try:
            return await call_next(request)
        except WireError as exc:
            return error(400, str(exc))
        except KeyError as exc:
            return error(404, f"not found: {exc.args[0] if exc.args else exc}")
        except Exception as exc:  # noqa: BLE001 - keep serving whatever a request does
            logger.exception("unhandled error on %s", request.url.path)
            return error(500, internal_error(exc))

    for routes in (session, training, sampling, futures, rest, exports):
        app.include_router(routes.router)
    return app
