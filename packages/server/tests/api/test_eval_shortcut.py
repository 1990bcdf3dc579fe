"""POST /api/v1/eval answered by the HTTP protocol, before uvicorn's request cycle
(``api/http_protocol.py``): which requests take that way, and that a request on it
behaves as one on the app's way (pipelining, keep-alive, HTTP/1.0, ``Expect``, a
client that leaves, a body pydantic rejects).

The app and uvicorn run in this process on a thread, as ``serve`` runs them, with a
real sandbox; an ASGI app put in front of the app's own stack counts the requests that
reach the app. A middleware an embedder adds sees every eval (the last test).
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx2
import pytest
import uvicorn
from fastapi import FastAPI
from python_executor_server.api.http_protocol import HttpProtocol
from python_executor_server.app import create_app
from python_executor_server.sandbox.mounts import remove_tree
from python_executor_server.settings import Settings
from starlette.types import ASGIApp, Message, Receive, Scope, Send

pytestmark = [pytest.mark.sandbox, pytest.mark.timeout(180)]

HELLO = json.dumps({"code": "print('hello')"}).encode()


class Seen:
    """ASGI middleware: the (method, path) of every HTTP request that reaches the app."""

    requests: list[tuple[str, str]] = []

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            Seen.requests.append((scope["method"], scope["path"]))
        await self.app(scope, receive, send)


@contextlib.contextmanager
def _serving(data: Path, prepare: Callable[[FastAPI], None]) -> Iterator[int]:
    """The app ``create_app`` makes, given to ``prepare``, served as ``serve`` serves it
    (uvicorn with our protocol) on a thread; yields its port."""
    tag = uuid.uuid4().hex[:8]
    run_dir = Path(f"/run/pyexec-test-{tag}") if os.geteuid() == 0 else data / "runs"
    settings = Settings(
        data_dir=data, run_dir=run_dir, cgroup_root=f"pyexec-test-{tag}", log_level="warning"
    )
    app = create_app(settings)
    prepare(app)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    config = uvicorn.Config(app, http=HttpProtocol, log_level="warning")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.05)
    try:
        yield sock.getsockname()[1]
    finally:
        server.should_exit = True
        thread.join(60)
        assert not thread.is_alive(), "the server did not stop"
        remove_tree(run_dir)  # (its run dir's skeleton: the server removes what is in it)


def _count_requests(app: FastAPI) -> None:
    """``Seen`` in front of the app's own stack, without adding a middleware to it (one
    added would make every eval go through the app: see the last test)."""
    app.middleware_stack = Seen(app.build_middleware_stack())


@pytest.fixture(scope="module")
def port(tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    with _serving(tmp_path_factory.mktemp("shortcut") / "data", _count_requests) as port:
        yield port


def _request(body: bytes = HELLO, *, head: str = "", version: str = "1.1") -> bytes:
    return (
        f"POST /api/v1/eval HTTP/{version}\r\nHost: x\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n{head}\r\n"
    ).encode() + body


def _responses(conn: socket.socket, count: int) -> list[tuple[int, dict[str, str], bytes]]:
    """``count`` responses read off ``conn`` (status, headers, body)."""
    buffer, out = b"", []
    while len(out) < count:
        if b"\r\n\r\n" in buffer:
            head, _, rest = buffer.partition(b"\r\n\r\n")
            lines = head.decode().split("\r\n")
            headers = dict(line.lower().split(": ", 1) for line in lines[1:])
            length = int(headers["content-length"])
            if len(rest) >= length:
                out.append((int(lines[0].split()[1]), headers, rest[:length]))
                buffer = rest[length:]
                continue
        chunk = conn.recv(65536)
        assert chunk, f"the server closed the connection after {len(out)} responses"
        buffer += chunk
    return out


def _connect(port: int) -> socket.socket:
    conn = socket.create_connection(("127.0.0.1", port), timeout=60)
    return conn


def _stdout(body: bytes) -> Any:
    return json.loads(body)["stdout"]


def test_an_eval_is_answered_without_the_app_and_the_rest_by_it(port: int) -> None:
    """Fails when the protocol hands a plain eval to the app, or keeps one it must not."""
    Seen.requests.clear()
    with httpx2.Client(base_url=f"http://127.0.0.1:{port}") as client:
        ok = client.post("/api/v1/eval", json={"code": "print('hello')"})
        assert ok.status_code == 200 and ok.json()["stdout"] == "hello\n"
        assert ok.headers["content-type"] == "application/json"
        assert "date" in ok.headers and "server" in ok.headers  # uvicorn's default headers
        assert Seen.requests == []
        rejected = client.post("/api/v1/eval", json={"code": 1})  # pydantic rejects it
        assert rejected.status_code == 400
        assert rejected.json()["error"].startswith("invalid request: code")
        as_text = client.post("/api/v1/eval", content=HELLO, headers={"content-type": "text/plain"})
        assert as_text.status_code == 400
        query = client.post("/api/v1/eval?x=1", json={"code": "print(2)"})
        assert query.json()["stdout"] == "2\n"
        for answered in (ok, query):  # the protocol's way and the app's
            _check_server_timing(answered)
        big = client.post("/api/v1/eval", json={"code": "print(3)  # " + "x" * 70_000})
        assert big.json()["stdout"] == "3\n"
    assert Seen.requests == [("POST", "/api/v1/eval")] * 4


def _check_server_timing(response: httpx2.Response) -> None:
    """``Server-Timing: total;dur=<ms>, run;dur=<ms>``: run is the result's span, total more."""
    timing = dict(
        metric.strip().split(";dur=") for metric in response.headers["server-timing"].split(",")
    )
    body = response.json()
    started, finished = (
        datetime.fromisoformat(body[key].rstrip("Z")) for key in ("started_at", "finished_at")
    )
    span_ms = (finished - started).total_seconds() * 1000
    assert float(timing["run"]) == pytest.approx(span_ms, abs=0.001)
    assert span_ms < float(timing["total"]) < span_ms + 5000


def test_an_error_of_the_run_is_answered_as_the_app_answers_it(port: int) -> None:
    with httpx2.Client(base_url=f"http://127.0.0.1:{port}") as client:
        response = client.post("/api/v1/eval", json={"code": "1", "python_version": "2.7"})
    assert response.status_code == 400
    assert response.json()["error"].startswith("python_version '2.7' is not available")


def test_pipelined_requests_are_answered_in_order_on_one_connection(port: int) -> None:
    """An eval, an eval behind it (the app's way: one is in flight), a GET, an eval."""
    health = b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n"
    second = json.dumps({"code": "print('second')"}).encode()
    with _connect(port) as conn:
        conn.sendall(_request() + _request(second) + health + _request())
        answers = _responses(conn, 4)
        assert [status for status, _, _ in answers] == [200] * 4
        assert _stdout(answers[0][2]) == "hello\n"
        assert _stdout(answers[1][2]) == "second\n"
        assert json.loads(answers[2][2])["status"] == "ok"
        assert _stdout(answers[3][2]) == "hello\n"
        conn.sendall(_request())  # still kept alive
        assert _stdout(_responses(conn, 1)[0][2]) == "hello\n"


def test_connection_close_http_1_0_and_expect_are_honoured(port: int) -> None:
    with _connect(port) as conn:
        conn.sendall(_request(head="Connection: close\r\n"))
        status, headers, body = _responses(conn, 1)[0]
        assert (status, headers.get("connection"), _stdout(body)) == (200, "close", "hello\n")
        assert conn.recv(1) == b""  # and closed
    with _connect(port) as conn:
        conn.sendall(_request(version="1.0"))
        status, _, body = _responses(conn, 1)[0]
        assert (status, _stdout(body)) == (200, "hello\n")
        assert conn.recv(1) == b""
    with _connect(port) as conn:
        head = _request(b"", head="Expect: 100-continue\r\n").replace(
            b"Content-Length: 0", f"Content-Length: {len(HELLO)}".encode()
        )
        conn.sendall(head)
        assert conn.recv(65536).startswith(b"HTTP/1.1 100 Continue")
        conn.sendall(HELLO)
        status, _, body = _responses(conn, 1)[0]
        assert (status, _stdout(body)) == (200, "hello\n")


def test_a_client_that_leaves_mid_run_leaves_a_finished_execution(port: int) -> None:
    marker = uuid.uuid4().hex
    code = f"import time\ntime.sleep(0.5)\nprint('{marker}')"
    with _connect(port) as conn:
        conn.sendall(_request(json.dumps({"code": code}).encode()))
        time.sleep(0.2)
    with httpx2.Client(base_url=f"http://127.0.0.1:{port}") as client:
        deadline = time.monotonic() + 30
        while True:
            listed = client.get("/api/v1/executions", params={"limit": 20}).json()
            mine = [e for e in listed["executions"] if e["stdout"] == f"{marker}\n"]
            if mine and mine[0]["status"] == "completed":
                break
            assert time.monotonic() < deadline, f"not finished: {listed}"
            time.sleep(0.1)
        assert client.post("/api/v1/eval", json={"code": "print(1)"}).json()["stdout"] == "1\n"


class Stamp:
    """An embedder's middleware: a header on every answer it passes."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def stamped(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), (b"x-embedder", b"seen")]
            await send(message)

        await self.app(scope, receive, stamped)


def test_a_middleware_added_to_the_app_sees_every_eval(tmp_path: Path) -> None:
    """Fails when the protocol answers an eval past a middleware added after create_app
    (an embedder's authentication would be passed by)."""
    with (
        _serving(tmp_path / "data", lambda app: app.add_middleware(Stamp)) as port,
        httpx2.Client(base_url=f"http://127.0.0.1:{port}") as client,
    ):
        for _ in range(2):
            response = client.post("/api/v1/eval", json={"code": "print('hello')"})
            assert response.json()["stdout"] == "hello\n"
            assert response.headers.get("x-embedder") == "seen"
