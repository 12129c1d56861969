"""The HTTP surface: ``GET /health``, ``GET /v1/models``, ``POST /v1/chat/completions`` (plain and SSE streamed).

Bodies are read and checked by ``qvlc.serve.protocol`` (not by FastAPI's models), so a malformed request is a 400
in OpenAI's error shape, never a 422; any other failure is a 500 in the same shape.
"""

from __future__ import annotations

import contextlib
import json
import time
import traceback
import uuid
from collections.abc import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException

from qvlc.serve.engine import Engine, Job, Outcome
from qvlc.serve.errors import ApiError
from qvlc.serve.media import MediaLimits
from qvlc.serve.protocol import chunk, completion, parse_chat_request
from qvlc.system.crash_log import write_log

MAX_BODY = 128 << 20  # a request's bytes (several base64 images)


def error_response(exc: ApiError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)


async def _read_body(request: Request) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > MAX_BODY:
        raise ApiError(f"the request is {int(declared)} bytes; the limit is {MAX_BODY}", code="request_too_large")
    parts, size = [], 0
    async for part in request.stream():
        size += len(part)
        if size > MAX_BODY:
            raise ApiError(f"the request is over {MAX_BODY} bytes", code="request_too_large")
        parts.append(part)
    return b"".join(parts)


def _error_handlers(app: FastAPI) -> None:
    """Every error, FastAPI's own included, in OpenAI's shape (a malformed request is a 400, never a 422)."""
    @app.exception_handler(ApiError)
    async def _api_error(_request: Request, exc: ApiError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation(_request: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(ApiError(f"malformed request: {exc.errors()[:1]}"))

    @app.exception_handler(HTTPException)
    async def _http(_request: Request, exc: HTTPException) -> JSONResponse:
        kind = "invalid_request_error" if exc.status_code < 500 else "server_error"
        return error_response(ApiError(str(exc.detail), code=str(exc.status_code), status=exc.status_code,
                                       kind=kind))


def create_app(engine: Engine, model_name: str, limits: MediaLimits) -> FastAPI:
    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        await engine.start()
        try:
            yield
        finally:
            await engine.stop()

    app = FastAPI(title="qvlc", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)

    _error_handlers(app)

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "model": model_name, "pending": engine.pending, "served": engine.served,
                "dropped": engine.dropped}

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": 0,
                                            "owned_by": "qvlc"}]}

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        try:
            return await _chat(request)
        except ApiError:
            raise
        except Exception as exc:  # noqa: BLE001 — a bug in qvlc: logged to a file, answered in OpenAI's shape
            path = write_log("".join(traceback.format_exception(exc)))
            raise ApiError(f"internal error (a bug in qvlc); the traceback is in {path}", code="internal_error",
                           status=500, kind="server_error") from None

    async def _chat(request: Request):
        parsed = parse_chat_request(await _read_body(request), limits)
        job = engine.submit(parsed, request.is_disconnected)
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        try:
            kind, value = await job.events.get()
            if kind == "error":
                raise value
            if parsed.stream:
                return StreamingResponse(_stream(job, rid, created, model_name), media_type="text/event-stream",
                                         headers={"Cache-Control": "no-cache"})
            text = []
            while True:
                kind, value = await job.events.get()
                if kind == "text":
                    text.append(value)
                elif kind == "error":
                    raise value
                else:
                    return completion(rid, created, model_name, "".join(text), value.finish_reason, value.usage)
        except BaseException:
            job.cancelled.set()  # the client left (cancelled) or the request failed: stop at the next token
            raise

    return app


async def _stream(job: Job, rid: str, created: int, model: str) -> AsyncIterator[str]:
    """SSE: a role chunk, content chunks, the finish chunk, a usage chunk when asked for, then ``[DONE]``."""
    try:
        yield chunk(rid, created, model, {"role": "assistant", "content": ""})
        while True:
            kind, value = await job.events.get()
            if kind == "text":
                yield chunk(rid, created, model, {"content": value})
            elif kind == "error":
                yield f"data: {json.dumps(value.body())}\n\n"
                break
            else:
                outcome: Outcome = value
                yield chunk(rid, created, model, {}, outcome.finish_reason)
                if job.request.include_usage:
                    yield chunk(rid, created, model, use=outcome.usage)
                break
        yield "data: [DONE]\n\n"
    finally:
        job.cancelled.set()
