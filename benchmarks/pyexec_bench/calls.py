"""Timed HTTP calls against the server and reading their results.

Usage::

    call = timed(lambda: client.post("/api/v1/eval", json={"code": "print(1)"}))
    call.ms, call.ok_run("1\\n"), run_span_ms(call.body)
"""

from __future__ import annotations

import contextlib
import json
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx2

from .loadgen import ConnectionClosed, encode_request, read_response_head
from .plan import Plan
from .server import Server

FINISHED = {"completed", "failed", "killed"}
HELLO = {"code": "print('hello')"}


@dataclass
class Call:
    ms: float
    status_code: int
    body: dict[str, Any] = field(default_factory=dict)
    # the answer's Server-Timing metrics (ms by name), where it had them (a 200 eval)
    server_timing: dict[str, float] = field(default_factory=dict)

    def ok_run(self, stdout: str) -> bool:
        return (
            self.status_code == 200
            and self.body.get("status") == "completed"
            and self.body.get("stdout") == stdout
        )


@dataclass
class Context:
    """What every scenario gets."""

    server: Server
    plan: Plan
    client: httpx2.Client
    calls: JsonClient  # the timed JSON calls: eval, /health, the cold paths
    default_python: str
    other_python: str | None
    scratch_dir: Path  # on the disk the server writes uploads to
    docker_image: str


def new_client(url: str, timeout: float = 120.0) -> httpx2.Client:
    return httpx2.Client(base_url=url, timeout=timeout, trust_env=False)


class JsonClient:
    """One keep-alive HTTP/1.1 connection for the timed JSON calls (eval, /health, the
    cold paths). The client shares the server's cores and its time is part of every
    round trip, so it does as little as a client can: the request written as bytes in
    one send, the response read only as far as its length (``loadgen.py``'s reader).
    ``http.client`` spent 0.27 ms of CPU on a request here, httpx2 0.75 ms. httpx2
    serves the rest (uploads).

    Usage::

        client = JsonClient("http://127.0.0.1:8080")
        call = client.post("/api/v1/eval", {"code": "print(1)"})   # a timed Call
    """

    def __init__(self, url: str, timeout: float = 120.0) -> None:
        parts = urlsplit(url)
        self._host, self._port = parts.hostname or "127.0.0.1", parts.port or 80
        self._timeout = timeout
        self._address = (self._host, self._port)
        self._sock: socket.socket | None = None
        self._buffer = bytearray()

    def post(self, path: str, body: dict[str, Any]) -> Call:
        return self._request("POST", path, json.dumps(body).encode())

    def get(self, path: str) -> Call:
        return self._request("GET", path, None)

    def _request(self, method: str, path: str, payload: bytes | None) -> Call:
        reused = self._sock is not None
        try:
            return self._send(method, path, payload)
        except (ConnectionClosed, BrokenPipeError, ConnectionResetError):
            if not reused:
                raise
        # The server closed the kept-alive connection while it was idle (uvicorn does
        # after 5 s): the request never reached it. Once more, on a new connection.
        return self._send(method, path, payload)

    def _send(self, method: str, path: str, payload: bytes | None) -> Call:
        if self._sock is None:
            self._sock = socket.create_connection(self._address, timeout=self._timeout)
            self._sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._buffer.clear()
        request = encode_request(method, self._address, path, payload)
        started = time.perf_counter()
        try:
            self._sock.sendall(request)
            while (answer := read_response_head(self._buffer)) is None:
                data = self._sock.recv(1 << 16)
                if not data:
                    raise ConnectionClosed("the server closed the connection")
                self._buffer += data
        except (OSError, ValueError):
            self.close()  # a fresh connection for the next call
            raise
        ms = (time.perf_counter() - started) * 1000
        status, head, body = answer
        return Call(ms, status, _decoded(body), server_timing(head))

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def __enter__(self) -> JsonClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def server_timing(head: bytes) -> dict[str, float]:
    """The ``Server-Timing`` metrics of a response head (lower case): ``{name: ms}``."""
    for line in head.split(b"\r\n"):
        name, _, value = line.partition(b":")
        if name == b"server-timing":
            metrics = (metric.strip().split(b";dur=", 1) for metric in value.split(b","))
            return {m[0].decode(): float(m[1]) for m in metrics if len(m) == 2}
    return {}


def _decoded(data: bytes) -> dict[str, Any]:
    try:
        body = json.loads(data)
    except ValueError:
        return {"text": data[:500].decode(errors="replace")}
    return body if isinstance(body, dict) else {"json": body}


def timed(send: Callable[[], httpx2.Response]) -> Call:
    started = time.perf_counter()
    response = send()
    ms = (time.perf_counter() - started) * 1000
    return Call(ms, response.status_code, _json(response))


def _json(response: httpx2.Response) -> dict[str, Any]:
    try:
        body = response.json()
    except ValueError:
        return {"text": response.text[:500]}
    return body if isinstance(body, dict) else {"json": body}


def parse_time(text: str) -> datetime:
    return datetime.fromisoformat(text.rstrip("Z"))


def run_span_ms(result: dict[str, Any]) -> float | None:
    """finished_at - started_at of a result, in ms (microsecond precision)."""
    started, finished = result.get("started_at"), result.get("finished_at")
    if not started or not finished:
        return None
    return (parse_time(finished) - parse_time(started)).total_seconds() * 1000


def wait_finished(
    client: httpx2.Client, execution_id: str, poll: float, timeout: float
) -> tuple[dict[str, Any], int]:
    """Poll GET /executions/{id} until finished: (the result, how many GETs it took)."""
    deadline = time.monotonic() + timeout
    polls = 0
    while True:
        polls += 1
        response = client.get(f"/api/v1/executions/{execution_id}")
        body = _json(response)
        if body.get("status") in FINISHED or time.monotonic() >= deadline:
            return body, polls
        time.sleep(poll)


@dataclass
class PoolDelta:
    """Hits and misses of the server's sandbox pool over a block (None: no pool reported)."""

    hits: int | None = None
    misses: int | None = None

    def note(self) -> str:
        if self.hits is None or self.misses is None:
            return ""
        return f"pool: {self.hits} hits, {self.misses} misses"


def pool_counts(client: httpx2.Client) -> tuple[int, int] | None:
    """(hits, misses) from /health's ``sandbox.pool``, when the server reports them."""
    try:
        pool = client.get("/health").json()["sandbox"]["pool"]
        return int(pool["hits"]), int(pool["misses"])
    except (httpx2.HTTPError, ValueError, KeyError, TypeError):
        return None


@contextlib.contextmanager
def pool_watch(client: httpx2.Client) -> Iterator[PoolDelta]:
    delta = PoolDelta()
    before = pool_counts(client)
    yield delta
    after = pool_counts(client)
    if before is not None and after is not None:
        delta.hits, delta.misses = after[0] - before[0], after[1] - before[1]


def joined(*notes: str) -> str:
    return "; ".join(n for n in notes if n)


def describe_failure(call: Call) -> str:
    body = call.body
    detail = body.get("error") or body.get("stderr") or body.get("text") or body.get("status")
    return f"HTTP {call.status_code}: {str(detail)[:200]}"
