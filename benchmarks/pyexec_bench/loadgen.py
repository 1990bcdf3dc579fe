"""The throughput row's clients: keep-alive connections driven by one thread.

The clients share the server's two cores, so every microsecond of CPU a client
spends on a request is taken from the server under test. ``http.client`` in
eight threads cost 0.5-0.6 ms of CPU per eval here (building the request,
parsing the response's headers into a message object, and the threads taking
turns at the GIL): 4 % of the machine's CPU per run. As a load generator such
as wrk does, this one sends the same pre-encoded request again and again and
reads each response only as far as it needs: the status line, its length, the
JSON body (which is still checked, run by run).

Usage::

    load = run_load("http://127.0.0.1:8080", "/api/v1/eval", {"code": "..."},
                    clients=8, seconds=10, check=lambda status, body: None)
    load.latencies, load.failures, load.elapsed
"""

from __future__ import annotations

import json
import selectors
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

Check = Callable[[int, dict[str, Any]], str | None]  # (status, body) -> why it failed, or None

CONNECT_TIMEOUT = 10.0
STALL_SECONDS = 120.0  # a response this late ends the load as failed


class ConnectionClosed(ConnectionError):
    """The server closed a kept-alive connection."""


@dataclass
class Load:
    latencies: list[float] = field(default_factory=list)  # ms, the runs that passed `check`
    failures: list[str] = field(default_factory=list)
    elapsed: float = 0.0  # s, from the first request to the last response


@dataclass(eq=False)
class _Connection:
    sock: socket.socket
    buffer: bytearray = field(default_factory=bytearray)
    sent_at: float = 0.0


def run_load(
    url: str, path: str, body: dict[str, Any], *, clients: int, seconds: float, check: Check
) -> Load:
    """``clients`` connections, each sending the request again as soon as its answer is in,
    for ``seconds``; each connection answers one request first (connect, warm up)."""
    parts = urlsplit(url)
    address = (parts.hostname or "127.0.0.1", parts.port or 80)
    request = encode_request("POST", address, path, json.dumps(body).encode())
    load = Load()
    selector = selectors.DefaultSelector()
    connections = [_connect(address, selector) for _ in range(clients)]
    try:
        _drive(selector, connections, request, load, check, deadline=None)  # warm-up
        load.latencies.clear()
        load.failures.clear()
        started = time.perf_counter()
        _drive(selector, connections, request, load, check, deadline=started + seconds)
        load.elapsed = time.perf_counter() - started
    finally:
        for connection in connections:
            selector.unregister(connection.sock)
            connection.sock.close()
        selector.close()
    return load


def encode_request(
    method: str, address: tuple[str, int], path: str, payload: bytes | None = None
) -> bytes:
    """An HTTP/1.1 request (keep-alive, the default), with a JSON ``payload`` if any."""
    head = f"{method} {path} HTTP/1.1\r\nHost: {address[0]}:{address[1]}\r\n"
    if payload is None:
        return (head + "\r\n").encode()
    head += f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n\r\n"
    return head.encode() + payload


def _connect(address: tuple[str, int], selector: selectors.BaseSelector) -> _Connection:
    sock = socket.create_connection(address, timeout=CONNECT_TIMEOUT)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setblocking(False)
    connection = _Connection(sock)
    selector.register(sock, selectors.EVENT_READ, connection)
    return connection


def _drive(
    selector: selectors.BaseSelector,
    connections: list[_Connection],
    request: bytes,
    load: Load,
    check: Check,
    deadline: float | None,
) -> None:
    """Send on every connection, then a new request on each as its answer completes,
    until ``deadline`` (None: one request each); returns once none is in flight."""
    for connection in connections:
        _send(connection, request)
    in_flight = len(connections)
    while in_flight:
        events = selector.select(STALL_SECONDS)
        if not events:
            raise RuntimeError(f"no response in {STALL_SECONDS:g} s")
        for key, _ in events:
            connection: _Connection = key.data
            data = connection.sock.recv(1 << 16)
            if not data:
                raise ConnectionClosed("the server closed a connection during the load")
            connection.buffer += data
            answer = read_response(connection.buffer)
            if answer is None:
                continue
            now = time.perf_counter()
            _record(load, check, answer, (now - connection.sent_at) * 1000)
            in_flight -= 1
            if deadline is not None and now < deadline:
                _send(connection, request)
                in_flight += 1


def _send(connection: _Connection, request: bytes) -> None:
    connection.sent_at = time.perf_counter()
    if connection.sock.send(request) != len(request):  # a few hundred bytes: one send
        raise RuntimeError("a request did not fit in the socket's buffer")


def read_response(buffer: bytearray) -> tuple[int, bytes] | None:
    """``(status, body)`` of the complete response at the start of ``buffer`` (taken out
    of it), None while it is incomplete. ValueError: not a response with a length (the
    server's JSON answers all have one)."""
    answer = read_response_head(buffer)
    return None if answer is None else (answer[0], answer[2])


def read_response_head(buffer: bytearray) -> tuple[int, bytes, bytes] | None:
    """``read_response``, with the response's head (lower case) between status and body."""
    end = buffer.find(b"\r\n\r\n")
    if end < 0:
        return None
    head = bytes(buffer[:end]).lower()
    marker = head.find(b"\r\ncontent-length:")
    if not head.startswith(b"http/1.1 ") or marker < 0:
        raise ValueError(f"not a response with a content-length: {head[:200]!r}")
    line_end = head.find(b"\r\n", marker + 2)
    length = int(head[marker + 17 : line_end if line_end >= 0 else len(head)])
    total = end + 4 + length
    if len(buffer) < total:
        return None
    body = bytes(buffer[end + 4 : total])
    del buffer[:total]
    return int(head[9:12]), head, body


def _record(load: Load, check: Check, answer: tuple[int, bytes], ms: float) -> None:
    status, body = answer
    try:
        decoded = json.loads(body)
    except ValueError:
        decoded = {"text": body[:200].decode(errors="replace")}
    why = check(status, decoded if isinstance(decoded, dict) else {"json": decoded})
    if why is None:
        load.latencies.append(ms)
    else:
        load.failures.append(why)
