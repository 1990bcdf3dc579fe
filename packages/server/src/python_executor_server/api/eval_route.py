"""``POST /api/v1/eval`` answered in front of FastAPI's routing, and its body size cap.

An eval is the service's hot path: a hello-world runs in a few milliseconds, and
FastAPI's per-request machinery (route matching over every route, dependency
solving, a dict round trip through pydantic for the body and again for the
response) cost about as much again, measured (docs/benchmarks.md). This ASGI
middleware serves the common case itself: a JSON body that ``EvalRequest``
accepts is validated straight from its bytes, run, and its ``ExecutionResult``
written straight to JSON. Every other request to the path (another content
type, a body pydantic rejects) is replayed to the FastAPI route, so that errors
keep one source; the route also stays what the OpenAPI document describes.

Errors the run raises (``ExecutorError``: queue full, code too large, ...) are
answered by ``error_response``, the same function as the app's error handler;
anything unexpected propagates to the app's catch-all (500).

Usage::

    app.add_middleware(EvalRoute, path="/api/v1/eval", max_bytes=...)
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass

from pydantic import ValidationError
from python_executor_client.models import EvalRequest
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..errors import ExecutorError
from .deps import Services
from .errors import error_response
from .executions import run_eval
from .timing import BEGAN, server_timing

EVAL_PATH = "/api/v1/eval"
_JSON_HEADERS = [(b"content-type", b"application/json")]
_OWN_HEADERS = (b"content-type", b"content-length")  # written by whoever sends the answer
Answer = tuple[int, bytes, list[tuple[bytes, bytes]]]  # status, JSON body, other headers


@dataclass(frozen=True)
class EvalShortcut:
    """What ``http_protocol.HttpProtocol`` needs to answer evals before uvicorn's request
    cycle (``app.state.eval_shortcut``): the path, the body cap it must stay under, and
    how many middleware the app had when it was made (``app.user_middleware``): one
    added since (an embedder's: authentication, logging, ...) must see every request,
    so the protocol then leaves evals to the app."""

    path: bytes
    max_bytes: int
    middleware: int


class BodyTooLarge(Exception):
    pass


class EvalRoute:
    def __init__(self, app: ASGIApp, path: str, max_bytes: int) -> None:
        self.app = app
        self.path = path
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] != self.path:
            await self.app(scope, receive, send)
            return
        began = scope.get(BEGAN) or time.perf_counter()
        headers = dict(scope["headers"])
        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await self._reject(send)
            return
        try:
            body = await self._body(receive)
        except BodyTooLarge:
            await self._reject(send)
            return
        if body is None:  # the client left before its body ended: nothing to answer
            return
        request = _accepted(scope, headers, body)
        if request is None:  # FastAPI answers it (an error, another method, ...)
            await self.app(scope, _replay(body, receive), send)
            return
        status, content, extra = await answer(scope["app"].state.services, request, began)
        await _send_json(send, status, content, extra)

    async def _body(self, receive: Receive) -> bytes | None:
        chunks: list[bytes] = []
        seen = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # http.disconnect
                return None
            chunk = message.get("body", b"")
            seen += len(chunk)
            if seen > self.max_bytes:
                raise BodyTooLarge
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)

    async def _reject(self, send: Send) -> None:
        body = json.dumps({"error": f"request body is over {self.max_bytes} bytes"}).encode()
        await _send_json(send, 413, body)


def _accepted(scope: Scope, headers: dict[bytes, bytes], body: bytes) -> EvalRequest | None:
    """The request, when this is a POST of JSON that ``EvalRequest`` accepts."""
    if scope["method"] != "POST" or not is_json(headers.get(b"content-type", b"")):
        return None
    return parsed(body)


def is_json(content_type: bytes) -> bool:
    """A Content-Type of JSON (what the fast way takes; the rest is FastAPI's)."""
    return content_type.split(b";", 1)[0].strip().lower() == b"application/json"


def parsed(body: bytes) -> EvalRequest | None:
    """The body as an ``EvalRequest``, None when pydantic rejects it (FastAPI then answers,
    so that a validation error has one wording)."""
    try:
        return EvalRequest.model_validate_json(body)
    except ValidationError:
        return None


async def answer(services: Services, request: EvalRequest, began: float) -> Answer:
    """The eval run, as status, JSON body and the headers beside Content-Type/-Length:
    its ``ExecutionResult`` (with a ``Server-Timing`` header: ``server_timing``), or the
    ``{"error"}`` answer of an ``ExecutorError``. ``began``: ``perf_counter()`` when the
    request's first bytes were read."""
    try:
        result = await run_eval(services, request)
    except ExecutorError as exc:
        response = error_response(exc, EVAL_PATH)
        extra = [(k, v) for k, v in response.raw_headers if k not in _OWN_HEADERS]
        return response.status_code, bytes(response.body), extra
    body = result.model_dump_json().encode()
    return 200, body, [server_timing(began, result.started_at, result.finished_at)]


def _replay(body: bytes, receive: Receive) -> Receive:
    """``receive`` for the app behind: the body already read, then the client's own."""
    sent = False

    async def replayed() -> Message:
        nonlocal sent
        if sent:
            return await receive()
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    return replayed


async def _send_json(
    send: Send, status: int, body: bytes, extra: list[tuple[bytes, bytes]] | None = None
) -> None:
    headers = [*_JSON_HEADERS, (b"content-length", str(len(body)).encode()), *(extra or ())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
