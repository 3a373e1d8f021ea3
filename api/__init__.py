"""The HTTP API: AUTOMATIC1111's ``/sdapi/v1`` and SageMaker's ``/ping`` + ``/invocations``.

``create_api(engine, ...)`` returns the FastAPI app that ``app.py`` serves, with the Gradio UI
mounted into it at ``/`` (one server, one port, one engine queue). The OpenAPI schema at
``/openapi.json`` (and Swagger UI at ``/docs``) is generated from ``api.schemas``; like every
route but ``/ping``, it needs credentials when auth is on. ``/metrics`` is Prometheus text.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable, Optional

from fastapi import Depends, FastAPI
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse

from engine import Engine, OutputStore, RateLimiter

from . import metrics, sagemaker, sdapi
from .auth import Credentials, require_user
from .errors import install_error_handlers
from .service import ApiContext

TITLE = "Stable Diffusion API"
DESCRIPTION = ("AUTOMATIC1111-compatible `/sdapi/v1` and the SageMaker hosting contract (`/ping`, `/invocations`), "
               "served from one engine queue shared with the web UI. See docs/api.md.")


def create_api(engine: Engine, outputs: "Path | OutputStore", auth: Iterable[tuple[str, str]] = (),
               allow_image_urls: bool = False, flags: Optional[dict[str, Any]] = None, enabled: bool = True,
               limiter: Optional[RateLimiter] = None) -> tuple[FastAPI, ApiContext]:
    """The server's FastAPI app (API routes when ``enabled``) and the context its routes share."""
    store = outputs if isinstance(outputs, OutputStore) else OutputStore(outputs)
    ctx = ApiContext(engine=engine, outputs=store, credentials=Credentials(auth),
                     allow_image_urls=allow_image_urls, flags=dict(flags or {}), limiter=limiter)
    app = FastAPI(title=TITLE, description=DESCRIPTION, version="1.0", docs_url=None, redoc_url=None,
                  openapi_url=None)
    if enabled:
        install_error_handlers(app)
        app.include_router(sdapi.create_router(ctx))
        app.include_router(sagemaker.create_router(ctx))
        app.include_router(metrics.create_router(metrics.EngineMetrics(engine), require_user(ctx.credentials)))
        _docs_routes(app, ctx)
    return app, ctx


def _docs_routes(app: FastAPI, ctx: ApiContext) -> None:
    """``/openapi.json`` and ``/docs``, behind the same credentials as the API."""
    user = require_user(ctx.credentials)

    @app.get("/openapi.json", include_in_schema=False, dependencies=[Depends(user)])
    def openapi() -> JSONResponse:
        return JSONResponse(app.openapi())

    @app.get("/docs", include_in_schema=False, dependencies=[Depends(user)])
    def docs() -> HTMLResponse:
        return get_swagger_ui_html(openapi_url="/openapi.json", title=f"{TITLE} — docs")


__all__ = ["create_api", "ApiContext", "Credentials"]
