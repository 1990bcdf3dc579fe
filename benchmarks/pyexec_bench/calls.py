"""Timed HTTP calls against the server and reading their results.

Usage::

    call = timed(lambda: client.post("/api/v1/eval", json={"code": "print(1)"}))
    call.ms, call.ok_run("1\\n"), run_span_ms(call.body)
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx2

from .plan import Plan
from .server import Server

FINISHED = {"completed", "failed", "killed"}
HELLO = {"code": "print('hello')"}


@dataclass
class Call:
    ms: float
    status_code: int
    body: dict[str, Any] = field(default_factory=dict)

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
    default_python: str
    other_python: str | None
    scratch_dir: Path  # on the disk the server writes uploads to
    docker_image: str


def new_client(url: str, timeout: float = 120.0) -> httpx2.Client:
    return httpx2.Client(base_url=url, timeout=timeout, trust_env=False)


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
