"""Weights for download (saved by `save_weights_external`, in `routes.training`): the signed per-file URLs, the
files, and checkpoint TTLs.

A signed URL carries its expiry and an HMAC of (path, expiry) under a key this engine process draws at start, so
whoever holds the URL can fetch that one file until it expires, without the API key (as Tinker's signed URLs).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import secrets
import time

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse

from posttrain.engine.checkpoints import check_name, parse_tinker_path
from posttrain.engine.routes.common import API, EngineDep, error, json_body
from posttrain.engine.wire import WireError

router = APIRouter(prefix=API)
FILES_PATH = f"{API}/external_files/"
URL_LIFETIME_SECONDS = 3600
_SIGNING_KEY = secrets.token_bytes(32)


def _signature(path: str, expires: int) -> str:
    return hmac.new(_SIGNING_KEY, f"{path}\n{expires}".encode(), hashlib.sha256).hexdigest()


@router.get("/training_runs/{run_id}/checkpoints/{kind}/{name}/external_weights_urls")
async def external_weights_urls(
    run_id: str, kind: str, name: str, request: Request, engine: EngineDep
) -> dict:
    ref = parse_tinker_path(f"tinker://{run_id}/{kind}/{name}")
    if ref.kind != "external_weights":
        raise WireError(f"{ref.tinker_path} is not an external weights checkpoint")
    files = engine.weights.store.meta(ref).get("files", [])
    expires = int(time.time()) + URL_LIFETIME_SECONDS
    base = str(request.base_url).rstrip("/")
    urls = {}
    for file in files:
        path = f"{FILES_PATH}{run_id}/{name}/{file}"
        urls[file] = f"{base}{path}?expires={expires}&signature={_signature(path, expires)}"
    return {"urls": urls, "expires": dt.datetime.fromtimestamp(expires, dt.UTC).isoformat()}


@router.get("/external_files/{run_id}/{name}/{file}")
async def external_file(
    run_id: str, name: str, file: str, request: Request, engine: EngineDep
) -> FileResponse:
    # The URL's own query, as _signature signed it: `expires` (unix seconds) and `signature`.
    text = request.query_params.get("expires", "0")
    expires = int(text) if text.isdigit() else 0
    signature = request.query_params.get("signature", "")
    if not hmac.compare_digest(signature, _signature(request.url.path, expires)):
        return error(403, "this download URL is not valid: ask for new URLs")  # type: ignore[return-value]
    if time.time() > expires:
        return error(403, "this download URL has expired: ask for new URLs")  # type: ignore[return-value]
    ref = parse_tinker_path(f"tinker://{run_id}/external_weights/{name}")
    path = engine.weights.store.exported_file(ref, check_name(file, "file name"))
    return FileResponse(path, media_type="application/octet-stream")


@router.put("/training_runs/{run_id}/checkpoints/{kind}/{name}/ttl")
async def set_ttl(run_id: str, kind: str, name: str, request: Request, engine: EngineDep) -> dict:
    ref = parse_tinker_path(f"tinker://{run_id}/{kind}/{name}")
    ttl = (await json_body(request)).get("ttl_seconds")
    if ttl is not None and not (isinstance(ttl, int) and 3600 <= ttl <= 10 * 365 * 86400):
        raise WireError("ttl_seconds must be between 3600 (1 hour) and 10 years, or null (never expires)")
    engine.weights.store.set_ttl(ref, ttl)
    return {}
