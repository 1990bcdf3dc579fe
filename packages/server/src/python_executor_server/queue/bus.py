"""Redis bus: kills, "finished" notices, live output and exec projects between nodes.

- Kills: ``PUBLISH {ns}:bus:kill <id>``. Every node subscribes; the one
  running the execution cancels its task (the sandbox is killed, the record
  ends ``killed``). A pending execution never needs this: the store's
  compare-and-set kills it wherever the DELETE arrives.
- Finished: ``PUBLISH {ns}:bus:finished <id>`` after every final transition;
  every node wakes its local waiters (sync requests, kills in progress).
  Waiters also re-read the store every second, so a lost message costs
  latency, never a stuck request.
- Output: the node running an execution appends every chunk it keeps to the
  stream ``{ns}:output:<id>`` (``XADD``; bounded by the output cap, since only
  kept bytes are published), then an ``end`` entry. A follower on any node
  reads the stream from its first entry (``XREAD BLOCK``): a late joiner gets
  everything produced so far, then the live chunks, with nothing lost in
  between. The stream expires a minute after the end (the record has it all).
- Projects: see ``projects.py``.

Usage::

    bus = RedisBus(url, RedisKeys("pyexec"), output_ttl=4000, projects=...)
    await bus.start(on_kill=service.cancel_local, on_finished=service.notify_local)
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog

from ..execution.jobs import Job
from ..execution.output import LogEvent, OutputCapture
from .base import IsFinished, QueueUnavailable, Signal
from .connection import cancel_safe, connect, fields, redacted, redis_errors, text
from .keys import RedisKeys
from .projects import RedisProjects
from .redis import cancel_requested, pause

if TYPE_CHECKING:
    from redis.asyncio import Redis

log = structlog.get_logger("python_executor.bus")

END = "end"  # the ``stream`` field of an output stream's last entry
ENDED_TTL = 60  # seconds an output stream is kept after its end entry


class RedisBus:
    def __init__(
        self,
        url: str,
        keys: RedisKeys,
        *,
        output_ttl: int,
        max_project_bytes: int,
        project_ttl: int,
        max_entries: int,
    ) -> None:
        self.url = url
        self.keys = keys
        self._output_ttl = output_ttl
        self._redis: Redis = connect(url)
        self._raw: Redis = connect(url, binary=True)
        self.projects = RedisProjects(
            self._raw, keys, max_bytes=max_project_bytes, ttl=project_ttl, max_entries=max_entries
        )
        self._listener: asyncio.Task[None] | None = None

    # --- start / stop ---------------------------------------------------------
    async def start(self, on_kill: Signal, on_finished: Signal) -> None:
        handlers = {self.keys.kill_channel: on_kill, self.keys.finished_channel: on_finished}
        subscribed = asyncio.Event()
        self._listener = asyncio.create_task(self._listen(handlers, subscribed), name="bus")
        try:
            await asyncio.wait_for(subscribed.wait(), timeout=10)
        except TimeoutError:
            await self.close()
            raise QueueUnavailable(f"cannot subscribe to Redis at {redacted(self.url)}") from None

    async def close(self) -> None:
        if self._listener is not None:
            self._listener.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._listener
            self._listener = None
        await self._redis.aclose()
        await self._raw.aclose()

    async def _listen(self, handlers: dict[str, Signal], subscribed: asyncio.Event) -> None:
        while not cancel_requested():  # resubscribe after a lost connection
            try:
                async with self._redis.pubsub(ignore_subscribe_messages=True) as pubsub:
                    await pubsub.subscribe(*handlers)
                    subscribed.set()
                    async for message in pubsub.listen():
                        _dispatch(handlers, message)
            except redis_errors() as exc:
                log.warning("bus subscription lost; resubscribing", error=str(exc))
                await pause(1)

    # --- kills and finishes ---------------------------------------------------
    async def publish_kill(self, execution_id: str) -> None:
        await self._redis.publish(self.keys.kill_channel, execution_id)

    async def publish_finished(self, execution_id: str) -> None:
        try:
            await self._redis.publish(self.keys.finished_channel, execution_id)
        except redis_errors() as exc:  # waiters poll the store as well
            log.warning("could not publish a finish", execution_id=execution_id, error=str(exc))

    # --- live output ----------------------------------------------------------
    async def publish_output(self, execution_id: str, capture: OutputCapture) -> None:
        events = capture.subscribe()  # replays what was kept so far: nothing is missed
        key = self.keys.output(execution_id)
        try:
            while True:
                batch = [await events.get()]
                while not events.empty():
                    batch.append(events.get_nowait())
                await self._append(key, batch)
                if batch[-1] is None:
                    return
        finally:
            capture.unsubscribe(events)

    async def _append(self, key: str, batch: Sequence[LogEvent | None]) -> None:
        ended = batch[-1] is None
        async with self._redis.pipeline(transaction=False) as pipe:
            for event in _merged(e for e in batch if e is not None):
                pipe.xadd(key, {"stream": event.stream, "text": event.text})
            if ended:
                pipe.xadd(key, {"stream": END})
            pipe.expire(key, ENDED_TTL if ended else self._output_ttl)
            try:
                await pipe.execute()
            except redis_errors() as exc:  # followers fall back to the finished record
                log.warning("could not publish output", key=key, error=str(exc))

    def follow_output(
        self, execution_id: str, finished: IsFinished
    ) -> AsyncIterator[LogEvent] | None:
        return self._follow(self.keys.output(execution_id), finished)

    async def _follow(self, key: str, finished: IsFinished) -> AsyncIterator[LogEvent]:
        last = "0-0"
        while True:
            reply = await cancel_safe(self._redis.xread({key: last}, count=1000, block=1000))
            entries = _entries(reply, key)
            if not entries and await finished():
                return  # never started, or its node died: the record says the rest
            for entry_id, entry in entries:
                last = entry_id
                if entry["stream"] == END:
                    return
                yield LogEvent(entry["stream"], entry.get("text", ""))

    # --- projects -------------------------------------------------------------
    async def ship_project(self, execution_id: str, job: Job) -> bool:
        if job.project_dir is None:
            return False
        await self.projects.ship(execution_id, Path(job.project_dir))
        return True

    async def fetch_project(self, execution_id: str, job: Job, staging: Path) -> Job:
        # A kill may land while this runs: it must not be swallowed (see ``cancel_safe``).
        return await cancel_safe(self.projects.fetch(execution_id, job, staging))

    async def drop_project(self, execution_id: str) -> None:
        await self.projects.drop(execution_id)


def _dispatch(handlers: dict[str, Signal], message: dict[str, Any]) -> None:
    if message.get("type") != "message":
        return
    handler = handlers.get(text(message["channel"]))
    if handler is not None:
        try:
            handler(text(message["data"]))
        except Exception:
            log.exception("bus handler failed", channel=message["channel"])


def _merged(events: Iterable[LogEvent]) -> list[LogEvent]:
    """Adjacent chunks of the same stream as one (a flood becomes a few entries)."""
    merged: list[LogEvent] = []
    for event in events:
        if merged and merged[-1].stream == event.stream:
            merged[-1] = LogEvent(event.stream, merged[-1].text + event.text)
        else:
            merged.append(event)
    return merged


def _entries(reply: Any, key: str) -> list[tuple[str, dict[str, str]]]:
    """XREAD's reply (RESP2 list or RESP3 map) as (id, fields) pairs."""
    if not reply:
        return []
    streams = reply.items() if isinstance(reply, dict) else reply
    for name, entries in streams:
        if text(name) == key:
            return [(text(entry_id), fields(row)) for entry_id, row in entries]
    return []
