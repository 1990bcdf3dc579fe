"""Redis clients for the queue and the bus (the optional ``redis`` package, imported lazily).

Usage::

    client = connect("redis://127.0.0.1:6379/0")              # text replies
    raw = connect("redis://127.0.0.1:6379/0", binary=True)    # bytes replies (project tars)
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Mapping
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import urlsplit

from .base import QueueUnavailable

if TYPE_CHECKING:
    from redis.asyncio import Redis

T = TypeVar("T")


def connect(url: str, *, binary: bool = False) -> Redis:
    """A client (no connection is made until the first command)."""
    try:
        import redis.asyncio
    except ImportError as exc:
        raise QueueUnavailable(
            "the redis queue needs the 'redis' package: pip install 'python-executor-server[redis]'"
        ) from exc
    try:
        return redis.asyncio.Redis.from_url(url, decode_responses=not binary)
    except ValueError as exc:
        raise QueueUnavailable(f"invalid redis_url {redacted(url)!r}: {exc}") from exc


def redacted(url: str) -> str:
    """The URL without credentials, for messages."""
    parts = urlsplit(url)
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.scheme}://{parts.hostname or ''}{port}{parts.path}"


def text(value: object) -> str:
    """Replies are text (``decode_responses=True``); the client's types say bytes | str."""
    if isinstance(value, bytes):
        return value.decode()
    if not isinstance(value, str):
        raise TypeError(f"expected text from Redis, got {type(value).__name__}")
    return value


def fields(row: Mapping[Any, Any]) -> dict[str, str]:
    return {text(k): text(v) for k, v in row.items()}


def redis_errors() -> tuple[type[BaseException], ...]:
    """What a lost or refused Redis connection raises (for retry loops)."""
    import redis.exceptions

    return (redis.exceptions.RedisError, OSError)


async def cancel_safe(call: Awaitable[T]) -> T:
    """Await a Redis call so that cancelling the caller always raises here.

    redis-py writes with ``asyncio.wait_for``, which on Python 3.11 swallows a
    cancellation that lands as the write completes: the caller carries on as if
    never cancelled (a kill or a shutdown lost). Run in its own task behind a
    shield, the call cannot eat the caller's cancellation.
    """
    task = asyncio.ensure_future(call)
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        task.cancel()
        task.add_done_callback(_retrieve)
        raise


def _retrieve(task: asyncio.Future[Any]) -> None:
    with contextlib.suppress(BaseException):
        task.exception()
