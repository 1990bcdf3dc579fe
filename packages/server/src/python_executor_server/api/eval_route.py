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

from pydantic import ValidationError
from python_executor_client.models import EvalRequest
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..errors import ExecutorError
from .errors import error_response
from .executions import run_eval

_JSON_HEADERS = [(b"content-type", b"application/json")]


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
        try:
            result = await run_eval(scope["app"].state.services, request)
        except ExecutorError as exc:
            await error_response(exc, scope["path"])(scope, receive, send)
            return
        content = result.model_dump_json().encode()
        await _send_json(send, 200, content)

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
    if scope["method"] != "POST":
        return None
    media = headers.get(b"content-type", b"").split(b";", 1)[0].strip().lower()
    if media != b"application/json":
        return None
    try:
        return EvalRequest.model_validate_json(body)
    except ValidationError:
        return None


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


async def _send_json(send: Send, status: int, body: bytes) -> None:
    headers = [*_JSON_HEADERS, (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
