"""HttpProtocol: a big body is read 1 MiB at a time, requests after it at asyncio's
default; an early answer survives a client still sending; a response's head and body
leave in one TCP segment.

A real uvicorn server on 127.0.0.1 (in this process, on its own thread) runs an
ASGI app that records the size of every body message it gets.
"""

from __future__ import annotations

import asyncio
import socket
import struct
import threading
import time
from collections.abc import Iterator

import pytest
import uvicorn
from python_executor_server.api.http_protocol import BIG_READ, DEFAULT_READ, HttpProtocol
from starlette.types import Receive, Scope, Send

MiB = 1 << 20


class Recorder:
    def __init__(self) -> None:
        self.sizes: list[list[int]] = []  # per request: the size of each body message

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        sizes: list[int] = []
        more = True
        while more:
            await asyncio.sleep(0.002)  # a slow reader: the socket's buffer fills meanwhile
            message = await receive()
            sizes.append(len(message.get("body", b"")))
            more = message.get("more_body", False)
        self.sizes.append(sizes)
        await send(
            {"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]}
        )
        await send({"type": "http.response.body", "body": b"ok"})


def _serve(app: object) -> tuple[uvicorn.Server, threading.Thread, int]:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    config = uvicorn.Config(app, http=HttpProtocol, log_level="warning", lifespan="off")  # type: ignore[arg-type]
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert time.monotonic() < deadline, "the server did not start"
        time.sleep(0.01)
    return server, thread, sock.getsockname()[1]


@pytest.fixture()
def served() -> Iterator[tuple[Recorder, int]]:
    app = Recorder()
    server, thread, port = _serve(app)
    try:
        yield app, port
    finally:
        server.should_exit = True
        thread.join(10)


def _post(conn: socket.socket, body: bytes) -> None:
    head = f"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n\r\n".encode()
    conn.sendall(head + body)
    reply = b""
    while not reply.endswith(b"ok"):
        chunk = conn.recv(65536)
        assert chunk, "the server closed the connection"
        reply += chunk
    assert reply.startswith(b"HTTP/1.1 200 ")


def test_big_bodies_are_read_in_bigger_pieces_and_small_requests_as_before(
    served: tuple[Recorder, int],
) -> None:
    app, port = served
    with socket.create_connection(("127.0.0.1", port)) as conn:
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 8 * MiB)
        _post(conn, b"x" * (64 * MiB))
        for _ in range(3):
            _post(conn, b"small")
    big, *small = app.sizes
    assert sum(big) == 64 * MiB
    assert max(big) > DEFAULT_READ  # asyncio's default alone never gives more than this
    assert max(big) <= BIG_READ + 64 * 1024  # a read, plus what uvicorn held back
    assert [sum(s) for s in small] == [5, 5, 5]


class EarlyAnswer:
    """Answers 413 with ``Connection: close`` before reading the body (as /exec does on a
    body over the limit)."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        headers = [(b"content-length", b"9"), (b"connection", b"close")]
        await send({"type": "http.response.start", "status": 413, "headers": headers})
        await send({"type": "http.response.body", "body": b"too large"})


def test_an_early_answer_survives_a_client_that_reads_only_after_sending() -> None:
    """Without the lingering close the kernel resets the connection over the unread body,
    and the reset can destroy the 413 before the client reads it."""
    server, thread, port = _serve(EarlyAnswer())
    try:
        for _ in range(20):
            with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
                conn.sendall(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 67108864\r\n\r\n")
                for _ in range(16):  # 16 MiB of the body, whatever the server said meanwhile
                    conn.sendall(b"\0" * MiB)
                reply = b""
                while chunk := conn.recv(65536):
                    reply += chunk
            assert reply.startswith(b"HTTP/1.1 413 "), reply[:80]
            assert reply.endswith(b"too large")
    finally:
        server.should_exit = True
        thread.join(15)
    assert not thread.is_alive(), "the server did not stop (a lingering connection held it)"


class Answers:
    """Answers each request with a head and a body of ``size`` bytes, ``pause`` seconds
    apart (0: in the same loop pass), as an app streaming its body would."""

    def __init__(self, size: int, pause: float) -> None:
        self.size, self.pause = size, pause

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        length = str(self.size).encode()
        await send(
            {"type": "http.response.start", "status": 200, "headers": [(b"content-length", length)]}
        )
        if self.pause:
            await asyncio.sleep(self.pause)
        await send({"type": "http.response.body", "body": b"b" * self.size})


def _data_segments_in(conn: socket.socket) -> int:
    """``tcpi_data_segs_in`` of struct tcp_info (linux/tcp.h, Linux 4.6+)."""
    info = conn.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 160)
    return int(struct.unpack_from("I", info, 152)[0])


def _segments_per_answer(app: Answers) -> list[int]:
    server, thread, port = _serve(app)
    try:
        counts = []
        with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
            for _ in range(5):
                before = _data_segments_in(conn)
                conn.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
                reply = b""
                while b"\r\n\r\n" not in reply or len(reply.split(b"\r\n\r\n", 1)[1]) < app.size:
                    chunk = conn.recv(1 << 20)
                    assert chunk, "the server closed the connection"
                    reply += chunk
                assert reply.startswith(b"HTTP/1.1 200 ")
                assert reply.split(b"\r\n\r\n", 1)[1] == b"b" * app.size
                counts.append(_data_segments_in(conn) - before)
        return counts
    finally:
        server.should_exit = True
        thread.join(10)


@pytest.mark.parametrize(
    ("size", "pause", "segments"),
    [
        pytest.param(700, 0, 1, id="head and body in one"),
        pytest.param(700, 0.05, 2, id="a body that comes later: the head is not kept back"),
    ],
)
def test_a_response_leaves_in_as_few_segments_as_it_can(
    size: int, pause: float, segments: int
) -> None:
    assert _segments_per_answer(Answers(size, pause)) == [segments] * 5


def test_a_big_body_is_sent_whole() -> None:
    counts = _segments_per_answer(Answers(3 * MiB, 0))
    assert all(count >= 2 for count in counts)  # (not one 3 MiB segment: just sent, and whole)
