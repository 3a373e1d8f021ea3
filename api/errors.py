"""Engine errors → HTTP answers, translated once for every API route (rule 8).

Anything a client can send gets a 4xx that says what to change; a model the server cannot run
right now (not compiled, cores busy, weights missing) is a 503 that says what an admin should run;
anything else is a bug: Starlette answers a plain 500 and uvicorn logs the traceback once.
"""
from __future__ import annotations

import logging
import math
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from engine import (ArtifactMismatch, ArtifactMissing, BackendUnavailable, CompileError, EngineError, InvalidRequest,
                    ModelLoadError, OutputWriteError, RateLimited, RegistryError, UnknownModel, UnknownSampler, UnsupportedResolution)

from .images import FieldError
from .schemas import ErrorResponse

log = logging.getLogger("api")

# Documented on every route, so the OpenAPI schema lists every status a client can get.
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorResponse, "description": "The request asks for something this server cannot do (the detail says what)."},
    401: {"model": ErrorResponse, "description": "Auth is on and no valid HTTP Basic credentials were sent."},
    404: {"model": ErrorResponse, "description": "Unknown model or sampler."},
    406: {"model": ErrorResponse, "description": "The Accept header asks for a type this route cannot give."},
    429: {"model": ErrorResponse, "description": "More generation requests than the server's --rate-limit allows; see Retry-After."},
    503: {"model": ErrorResponse, "description": "The model cannot run right now (not compiled, cores busy, load failed)."},
}

_SERVER_STATE = (ArtifactMissing, ArtifactMismatch, BackendUnavailable, ModelLoadError, CompileError, RegistryError,
                 OutputWriteError)


def status_of(exc: EngineError) -> int:
    """The HTTP status of an engine error."""
    if isinstance(exc, (UnknownSampler, UnknownModel)):
        return 404
    if isinstance(exc, RateLimited):
        return 429
    if isinstance(exc, UnsupportedResolution):
        return 400
    if isinstance(exc, InvalidRequest):
        return 422
    if isinstance(exc, _SERVER_STATE) or type(exc).__name__ in ("CoresBusy", "ModelTooLarge"):
        return 503
    return 400


def detail_of(exc: EngineError) -> str:
    """A1111 answers an unknown sampler with "Sampler not found"; keep its words, then ours."""
    return f"Sampler not found: {exc}" if isinstance(exc, UnknownSampler) else str(exc)


async def _engine_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, EngineError)
    code = status_of(exc)
    log.info("%s %s refused (%d): %s", request.method, request.url.path, code, exc)
    headers = {"Retry-After": "5"} if code == 503 else None
    if isinstance(exc, RateLimited):
        headers = {"Retry-After": str(max(1, math.ceil(exc.retry_after_s)))}
    if code == 422:  # FastAPI's validation shape, so every 422 reads the same
        return JSONResponse({"detail": [{"type": "value_error", "loc": ["body"], "msg": str(exc)}]}, status_code=422)
    return JSONResponse({"detail": detail_of(exc)}, status_code=code, headers=headers)


async def _field_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, FieldError)
    if exc.status == 422:
        loc = [int(part) if part.isdigit() else part for part in exc.field.replace("]", "").split("[")]
        detail = [{"type": "value_error", "loc": ["body", *loc], "msg": exc.message}]
        return JSONResponse({"detail": detail}, status_code=422)
    return JSONResponse({"detail": str(exc)}, status_code=exc.status)


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(EngineError, _engine_error)
    app.add_exception_handler(FieldError, _field_error)
