"""The one mapping of an ``ExecutorError`` (and of an unexpected error) to its HTTP answer:
``{"error": ...}``."""

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


def internal_error_response(exc: Exception, path: str) -> JSONResponse:
    """An error nothing else answered (a bug): logged with its traceback, answered 500."""
    log.exception("unhandled error", path=path, exc_info=exc)
    return JSONResponse({"error": f"internal error: {type(exc).__name__}"}, 500)
