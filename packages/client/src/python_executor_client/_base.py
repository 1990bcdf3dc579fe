"""Sans-I/O core of both clients: which request to send, and what a response means.

Nothing here touches the network. ``_client.py`` and ``_async_client.py`` send the
``Call`` these functions describe and hand the ``httpx2.Response`` back for decoding,
so the two shells differ only in ``await``.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import quote

import httpx2
from pydantic import BaseModel, ValidationError

from ._options import build_metadata
from ._packing import FilesInput, TarInput, Upload, pack
from .errors import (
    BadRequest,
    ConnectionFailed,
    ExecutionTimeout,
    InvalidInput,
    NotFound,
    PayloadTooLarge,
    ProtocolError,
    PythonExecutorError,
    ServerBusy,
    ServerError,
)
from .models import (
    METADATA_FIELD,
    TAR_FIELD,
    ErrorResponse,
    EvalRequest,
    ExecutionStatus,
    Metadata,
)

__all__ = [
    "DEFAULT_SERVER",
    "Call",
    "ProgressCallback",
    "decode",
    "decode_json",
    "error_from",
    "eval_call",
    "execution_call",
    "health_call",
    "kill_call",
    "list_call",
    "logs_call",
    "logs_unsupported",
    "normalize_base_url",
    "prepare_submit",
    "submit_call",
    "timeout_for",
    "transport_error",
]

DEFAULT_SERVER = "http://localhost:8080"
API = "/api/v1"
# A synchronous run may legitimately take its whole timeout_seconds, plus setup.
_RUN_MARGIN_SECONDS = 60.0
_SSE_UNSUPPORTED = frozenset({404, 405, 501})
_ERRORS: dict[int, type[ServerError]] = {400: BadRequest, 404: NotFound, 413: PayloadTooLarge}

ProgressCallback = Callable[[int, int], None]
"""Called as ``progress(bytes_sent, bytes_total)`` while an upload is sent."""

_Model = TypeVar("_Model", bound=BaseModel)


@dataclass(frozen=True)
class Call:
    """One HTTP request, described; the shells send it."""

    method: str
    path: str
    params: Mapping[str, str | int] | None = None
    headers: Mapping[str, str] | None = None
    body: bytes | None = None
    stream: Callable[[], Iterator[bytes]] | None = None
    blocking: bool = False  # producing ``stream`` reads files: async shells use a thread
    read_timeout: float | None = None  # overrides the client's timeout


def normalize_base_url(base_url: str) -> str:
    """``localhost:8080`` → ``http://localhost:8080``; no trailing slash."""
    url = base_url.strip() or DEFAULT_SERVER
    if "://" not in url:
        url = "http://" + url
    return url.rstrip("/")


def timeout_for(call: Call, client_timeout: float) -> httpx2.Timeout:
    read = max(client_timeout, call.read_timeout or 0.0)
    return httpx2.Timeout(client_timeout, read=read)


def _run_timeout(timeout_seconds: int | None) -> float | None:
    return None if timeout_seconds is None else timeout_seconds + _RUN_MARGIN_SECONDS


def _execution_path(execution_id: str) -> str:
    return f"{API}/executions/{quote(execution_id, safe='')}"


def submit_call(
    wait: bool, upload: Upload, metadata: Metadata, progress: ProgressCallback | None = None
) -> Call:
    """``exec/sync`` (``wait``) or ``exec/async``: a streamed multipart body, metadata first."""
    boundary = secrets.token_hex(16)
    head = _part(boundary, METADATA_FIELD, "application/json")
    head += metadata.model_dump_json(exclude_none=True).encode() + b"\r\n"
    head += _part(boundary, TAR_FIELD, "application/x-tar", filename="code.tar")
    tail = f"\r\n--{boundary}--\r\n".encode()
    total = len(head) + upload.size + len(tail)

    def chunks() -> Iterator[bytes]:
        sent = 0
        for chunk in _chain(head, upload.chunks(), tail):
            yield chunk
            sent += len(chunk)
            if progress is not None:
                progress(sent, total)

    headers = {
        "Content-Type": f"multipart/form-data; boundary={boundary}",
        "Content-Length": str(total),
    }
    config = metadata.config
    return Call(
        "POST",
        f"{API}/exec/{'sync' if wait else 'async'}",
        headers=headers,
        stream=chunks,
        blocking=upload.blocking,
        read_timeout=_run_timeout(config.timeout_seconds if config else None) if wait else None,
    )


def _part(boundary: str, name: str, content_type: str, filename: str | None = None) -> bytes:
    disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
    return (
        f"--{boundary}\r\nContent-Disposition: {disposition}\r\n"
        f"Content-Type: {content_type}\r\n\r\n"
    ).encode()


def _chain(head: bytes, body: Iterator[bytes], tail: bytes) -> Iterator[bytes]:
    yield head
    yield from body
    yield tail


def eval_call(request: EvalRequest) -> Call:
    config = request.config
    return Call(
        "POST",
        f"{API}/eval",
        headers={"Content-Type": "application/json"},
        body=request.model_dump_json(exclude_none=True).encode(),
        read_timeout=_run_timeout(config.timeout_seconds if config else None),
    )


def execution_call(execution_id: str) -> Call:
    return Call("GET", _execution_path(execution_id))


def kill_call(execution_id: str) -> Call:
    return Call("DELETE", _execution_path(execution_id))


def logs_call(execution_id: str) -> Call:
    headers = {"Accept": "text/event-stream", "Cache-Control": "no-store"}
    return Call("GET", _execution_path(execution_id) + "/logs", headers=headers)


def list_call(status: ExecutionStatus | str | None, limit: int | None, cursor: str | None) -> Call:
    params: dict[str, str | int] = {}
    if status is not None:
        params["status"] = ExecutionStatus(status).value
    if limit is not None:
        params["limit"] = limit
    if cursor is not None:
        params["cursor"] = cursor
    return Call("GET", f"{API}/executions", params=params)


def health_call() -> Call:
    return Call("GET", "/health")


def logs_unsupported(response: httpx2.Response) -> bool:
    """A server without the live-logs endpoint: follow by polling instead."""
    return response.status_code in _SSE_UNSUPPORTED


def decode(model: type[_Model], response: httpx2.Response) -> _Model:
    """The response body as ``model``, or the matching ``ServerError``."""
    if response.status_code >= 400:
        raise error_from(response)
    try:
        return model.model_validate_json(response.content)
    except ValidationError as exc:
        raise ProtocolError(
            f"unexpected answer from {response.request.url} (HTTP {response.status_code}): "
            f"{exc.errors()[0].get('msg', 'invalid body')}"
        ) from None


def decode_json(response: httpx2.Response) -> dict[str, Any]:
    if response.status_code >= 400:
        raise error_from(response)
    try:
        body = json.loads(response.content)
    except ValueError:
        body = None
    if not isinstance(body, dict):
        raise ProtocolError(f"unexpected answer from {response.request.url}: not a JSON object")
    return body


def error_from(response: httpx2.Response) -> ServerError:
    """The exception for an error response, carrying the server's own message."""
    status = response.status_code
    message = _error_message(response)
    if status == 503:
        return ServerBusy(status, message, _retry_after(response.headers.get("Retry-After")))
    return _ERRORS.get(status, ServerError)(status, message)


def _error_message(response: httpx2.Response) -> str:
    try:
        return ErrorResponse.model_validate_json(response.content).error
    except ValidationError:
        pass
    text = response.content.decode("utf-8", "replace").strip()
    return text[:300] or response.reason_phrase or f"HTTP {response.status_code}"


def _retry_after(value: str | None) -> float | None:
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None


def transport_error(exc: Exception, base_url: str) -> PythonExecutorError:
    """What went wrong below HTTP, as one sentence naming the server."""
    detail = str(exc) or type(exc).__name__
    if isinstance(exc, httpx2.ConnectError | httpx2.ConnectTimeout):
        return ConnectionFailed(f"cannot reach the server at {base_url}: {detail}")
    if isinstance(exc, httpx2.TimeoutException):
        return ExecutionTimeout(f"no answer from the server at {base_url} in time ({detail})")
    if isinstance(exc, httpx2.UnsupportedProtocol | httpx2.InvalidURL):
        return InvalidInput(f"invalid server URL {base_url!r}: {detail}")
    return ConnectionFailed(f"connection to the server at {base_url} failed: {detail}")


def prepare_submit(
    wait: bool,
    files: FilesInput | None,
    tar_data: TarInput | None,
    metadata: Metadata | None,
    options: Mapping[str, Any],
    progress: ProgressCallback | None,
) -> Call:
    """Pack the input and merge the options: everything ``execute_*`` does before sending."""
    upload = pack(files, tar_data)
    return submit_call(wait, upload, build_metadata(metadata, options, upload.entrypoint), progress)
