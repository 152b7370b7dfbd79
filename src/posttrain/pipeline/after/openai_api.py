"""OpenAI's chat-completions API over one Tinker sampling client: `GET /v1/models`, `GET /v1/models/{id}` and
`POST /v1/chat/completions` (whole or streamed), the messages rendered with the run's renderer.

The sampler returns whole sequences, so a streamed completion arrives as one content chunk per choice (after the
role chunk, before the finish chunk). `stop` strings are applied to the parsed answer: the text is cut at the first
one, and the sampler stops only at the renderer's own end of turn (or `max_tokens`). Errors have OpenAI's shape,
`{"error": {"message", "type", "param", "code"}}`, so its clients raise their usual exceptions.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException

from posttrain.pipeline.after.finished import answer_text
from posttrain.util import short_error

DEFAULT_MAX_TOKENS = 256
MAX_CHOICES = 16
# OpenAI's "developer" role is its newer name for "system"; renderers know only the latter.
_ROLES = {"developer": "system"}


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    # Fields this API does not use (name, tool_calls, refusal...) are ignored, as most OpenAI-compatible servers do.
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None

    def rendered(self) -> dict[str, str]:
        content = (
            self.content if isinstance(self.content, str) else "".join(p.text for p in self.content or [])
        )
        return {"role": _ROLES.get(self.role, self.role), "content": content}


class StreamOptions(BaseModel):
    include_usage: bool = False


class ChatRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)  # the newer clients' name for max_tokens
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    seed: int | None = None
    stop: str | list[str] | None = None
    n: int | None = Field(default=None, ge=1, le=MAX_CHOICES)
    stream: bool | None = False
    stream_options: StreamOptions | None = None

    def stops(self) -> list[str]:
        found = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return [s for s in found if s]


@dataclass(frozen=True)
class Served:
    """What one server answers with: the model id clients name, its sampler and the run's renderer."""

    model_id: str
    sampler: Any
    renderer: Any


@dataclass(frozen=True)
class Choice:
    text: str
    finish_reason: Literal["stop", "length"]
    tokens: int


@dataclass(frozen=True)
class Completion:
    id: str
    created: int
    prompt_tokens: int
    choices: list[Choice]

    def usage(self) -> dict[str, int]:
        completion_tokens = sum(c.tokens for c in self.choices)
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": self.prompt_tokens + completion_tokens,
        }


class ApiError(Exception):
    def __init__(
        self, status: int, message: str, kind: str, param: str | None = None, code: str | None = None
    ):
        super().__init__(message)
        self.status, self.kind, self.param, self.code = status, kind, param, code


def error_response(
    status: int, message: str, kind: str, param: str | None = None, code: str | None = None
) -> JSONResponse:
    error = {"message": message, "type": kind, "param": param, "code": code}
    return JSONResponse({"error": error}, status_code=status)


def create_app(served: Served) -> FastAPI:
    app = FastAPI(title="posttrain serve-model", docs_url=None, redoc_url=None, openapi_url=None)
    _add_error_handlers(app)

    @app.get("/v1/models")
    async def list_models() -> dict[str, Any]:
        return {"object": "list", "data": [_model_card(served.model_id)]}

    @app.get("/v1/models/{model:path}")
    async def get_model(model: str) -> dict[str, Any]:
        _check_model(served, model)
        return _model_card(served.model_id)

    @app.post("/v1/chat/completions", response_model=None)
    async def chat_completions(body: ChatRequest) -> dict[str, Any] | StreamingResponse:
        _check_model(served, body.model)
        completion = await complete(served, body)
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            events = _sse(completion_chunks(completion, served.model_id, include_usage))
            return StreamingResponse(events, media_type="text/event-stream")
        return completion_body(completion, served.model_id)

    return app


def _add_error_handlers(app: FastAPI) -> None:
    async def invalid(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        first = exc.errors()[0] if exc.errors() else {}
        param = ".".join(str(p) for p in first.get("loc", ())[1:]) or None  # loc starts with "body"
        message = f"{param}: {first.get('msg')}" if param else str(first.get("msg", "invalid request"))
        return error_response(400, message, "invalid_request_error", param)

    async def http_error(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, HTTPException)
        return error_response(exc.status_code, str(exc.detail), "invalid_request_error")

    async def api_error(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, ApiError)
        return error_response(exc.status, str(exc), exc.kind, exc.param, exc.code)

    app.add_exception_handler(RequestValidationError, invalid)
    app.add_exception_handler(HTTPException, http_error)
    app.add_exception_handler(ApiError, api_error)


def _model_card(model_id: str) -> dict[str, Any]:
    return {"id": model_id, "object": "model", "created": 0, "owned_by": "posttrain"}


def _check_model(served: Served, model: str) -> None:
    if model != served.model_id:
        raise ApiError(
            404,
            f"The model `{model}` does not exist; this server has `{served.model_id}`",
            "invalid_request_error",
            "model",
            "model_not_found",
        )


async def complete(served: Served, body: ChatRequest) -> Completion:
    """Sample the request's `n` answers to its conversation, rendered as the run renders it."""
    import tinker

    prompt = served.renderer.build_generation_prompt([m.rendered() for m in body.messages])
    params = tinker.SamplingParams(
        max_tokens=body.max_completion_tokens or body.max_tokens or DEFAULT_MAX_TOKENS,
        temperature=1.0 if body.temperature is None else body.temperature,
        top_p=1.0 if body.top_p is None else body.top_p,
        seed=body.seed,
        stop=served.renderer.get_stop_sequences(),
    )
    try:
        reply = await served.sampler.sample(prompt, num_samples=body.n or 1, sampling_params=params)
    except tinker.BadRequestError as exc:  # e.g. the prompt and max_tokens do not fit the model's context
        message = f"the sampler refused the request: {short_error(exc, 300)}"
        raise ApiError(400, message, "invalid_request_error") from None
    except Exception as exc:  # noqa: BLE001 - the service failed this request; the server goes on
        raise ApiError(500, f"sampling failed: {short_error(exc, 300)}", "server_error") from None
    choices = [_choice(served.renderer, seq, body.stops()) for seq in reply.sequences]
    return Completion(f"chatcmpl-{uuid.uuid4().hex}", int(time.time()), prompt.length, choices)


def _choice(renderer: Any, sequence: Any, stops: list[str]) -> Choice:
    text = answer_text(renderer, list(sequence.tokens))
    finish: Literal["stop", "length"] = "length" if sequence.stop_reason == "length" else "stop"
    cuts = [i for i in (text.find(s) for s in stops) if i >= 0]
    if cuts:
        text, finish = text[: min(cuts)], "stop"
    return Choice(text, finish, len(sequence.tokens))


def completion_body(completion: Completion, model_id: str) -> dict[str, Any]:
    choices = [
        {
            "index": i,
            "message": {"role": "assistant", "content": c.text},
            "logprobs": None,
            "finish_reason": c.finish_reason,
        }
        for i, c in enumerate(completion.choices)
    ]
    return {
        "id": completion.id,
        "object": "chat.completion",
        "created": completion.created,
        "model": model_id,
        "choices": choices,
        "usage": completion.usage(),
    }


def completion_chunks(completion: Completion, model_id: str, include_usage: bool) -> list[dict[str, Any]]:
    """OpenAI's chunks for a completion: per choice, the role, the whole text, the finish reason; then the usage."""
    head = {
        "id": completion.id,
        "object": "chat.completion.chunk",
        "created": completion.created,
        "model": model_id,
    }
    extra: dict[str, Any] = {"usage": None} if include_usage else {}

    def chunk(index: int, delta: dict[str, str], finish: str | None = None) -> dict[str, Any]:
        choice = {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}
        return {**head, "choices": [choice], **extra}

    chunks = []
    for i, c in enumerate(completion.choices):
        chunks += [chunk(i, {"role": "assistant", "content": ""}), chunk(i, {"content": c.text})]
        chunks.append(chunk(i, {}, c.finish_reason))
    if include_usage:
        chunks.append({**head, "choices": [], "usage": completion.usage()})
    return chunks


async def _sse(chunks: list[dict[str, Any]]) -> AsyncIterator[str]:
    for c in chunks:
        yield f"data: {json.dumps(c)}\n\n"
    yield "data: [DONE]\n\n"
