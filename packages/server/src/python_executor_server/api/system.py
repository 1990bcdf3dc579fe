"""Health, metrics and the offline API docs."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from .. import __version__
from .deps import services

router = APIRouter(tags=["system"])


@router.get("/health", summary="Liveness, backend and enforcement in force")
async def health(request: Request) -> dict[str, Any]:
    svc = services(request)
    return {
        "status": "ok",
        "version": __version__,
        "queue_depth": await svc.service.queue.depth(),
        "running": svc.service.running_count(),
        **svc.health,
        "sandbox": svc.backend.describe(),
    }


@router.get("/metrics", summary="Prometheus metrics", response_class=Response)
async def metrics(request: Request) -> Response:
    svc = services(request)
    svc.metrics.queue_depth.set(await svc.service.queue.depth())
    return Response(generate_latest(svc.metrics.registry), media_type=CONTENT_TYPE_LATEST)


@router.get("/docs", include_in_schema=False)
async def swagger_ui() -> HTMLResponse:
    return get_swagger_ui_html(
        openapi_url="/openapi.json",
        title="python-executor API",
        swagger_js_url="/docs/static/swagger-ui-bundle.js",
        swagger_css_url="/docs/static/swagger-ui.css",
        swagger_favicon_url="/docs/static/favicon-32x32.png",
    )


@router.get("/docs/doc.json", include_in_schema=False)
async def openapi_alias(request: Request) -> JSONResponse:
    return JSONResponse(request.app.openapi())
