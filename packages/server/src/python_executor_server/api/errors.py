"""The one mapping of an ``ExecutorError`` to its HTTP answer: ``{"error": ...}``."""

from __future__ import annotations

from fastapi.responses import JSONResponse

from ..errors import ExecutorError, QueueFull
from ..logs import get_logger

log = get_logger("python_executor.app")


def error_response(exc: ExecutorError, path: str) -> JSONResponse:
    headers = {"Retry-After": str(exc.retry_after)} if isinstance(exc, QueueFull) else {}
    if path.startswith("/api/v1/exec/"):
        # The body may still be arriving: close rather than read and discard the rest.
        headers["Connection"] = "close"
    if exc.status_code >= 500 and not isinstance(exc, QueueFull):
        log.error("request failed", path=path, error=exc.message)
    return JSONResponse({"error": exc.message}, exc.status_code, headers=headers)
