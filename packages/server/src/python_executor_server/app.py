"""create_app(settings): routers, error mapping, offline docs, lifespan.

Usage::

    app = create_app(Settings())
    uvicorn.run(app, host=settings.host, port=settings.port)
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import swagger_ui_bundle  # type: ignore[import-untyped]
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from . import __version__
from .api import executions, system
from .api.deps import Services
from .api.errors import error_response, internal_error_response
from .api.eval_route import EVAL_PATH, EvalRoute, EvalShortcut
from .errors import ExecutorError
from .execution.interpreters import default_version
from .execution.jobs import JobBuilder
from .logs import get_logger
from .node import running_node
from .settings import Settings

log = get_logger("python_executor.app")

DESCRIPTION = """Run untrusted Python in a kernel-level sandbox.

Send a project as an uncompressed tar (`/api/v1/exec/sync`, `/api/v1/exec/async`)
or code as JSON (`/api/v1/eval`); get stdout, stderr, the exit code, the value of
the last expression and a clear reason when something went wrong. Every error is
`{"error": "<one sentence>"}`.
"""


def create_app(settings: Settings) -> FastAPI:
    app = FastAPI(
        title="python-executor",
        version=__version__,
        description=DESCRIPTION,
        docs_url=None,
        redoc_url=None,
        openapi_url="/openapi.json",
        lifespan=_lifespan(settings),
    )
    app.include_router(executions.router)
    app.include_router(system.router)
    app.mount("/docs/static", StaticFiles(directory=_swagger_dir()), name="swagger-static")
    # POST /api/v1/eval is served in front of the router (the route stays for errors
    # and the OpenAPI document), and its body is capped there ...
    max_bytes = 8 * settings.max_eval_code_bytes + 65536
    app.add_middleware(EvalRoute, path=EVAL_PATH, max_bytes=max_bytes)
    # ... and in front of uvicorn's request cycle, by our HTTP protocol, where it can be
    app.state.eval_shortcut = EvalShortcut(EVAL_PATH.encode(), max_bytes, len(app.user_middleware))
    _add_error_handlers(app)
    return app


def _swagger_dir() -> Path:
    return Path(swagger_ui_bundle.swagger_ui_path)


def _lifespan(settings: Settings):  # type: ignore[no-untyped-def]
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with running_node(settings) as node:
            interpreters, backend = node.interpreters, node.backend
            health = {
                "backend": backend.name,
                "store": settings.store,
                "queue": settings.queue,
                "node_id": node.node_id,
                "runs_executions": settings.run_workers,
                "python_versions": list(interpreters),
                "default_python": default_version(settings, interpreters) if interpreters else None,
            }
            app.state.services = Services(
                settings,
                node.service,
                JobBuilder(settings, interpreters),
                backend,
                node.metrics,
                health,
            )
            log.info(
                "server ready",
                backend=backend.name,
                store=settings.store,
                queue=settings.queue,
                pythons=list(interpreters),
            )
            yield

    return lifespan


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ExecutorError)
    async def executor_error(request: Request, exc: ExecutorError) -> JSONResponse:
        return error_response(exc, request.url.path)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        err = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in err.get("loc", ()) if p != "body") or "body"
        message = f"invalid request: {where}: {err.get('msg', 'invalid value')}"
        return JSONResponse({"error": message}, 400)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = exc.detail if isinstance(exc.detail, str) else "request failed"
        if exc.status_code == 404 and message == "Not Found":
            message = f"no such endpoint: {request.method} {request.url.path}"
        return JSONResponse({"error": message}, exc.status_code, headers=exc.headers)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        return internal_error_response(exc, request.url.path)
