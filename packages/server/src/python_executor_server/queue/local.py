"""In-process queue (a bounded backlog, at most max_concurrent runs at once) and bus."""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncIterator
from pathlib import Path

import structlog

from ..errors import QueueFull
from ..execution.jobs import Job
from ..execution.output import LogEvent, OutputCapture
from .base import Handler, IsFinished, LostHandler, Signal

log = structlog.get_logger("python_executor.queue")


class LocalQueue:
    """Runs each id in a task of its own as soon as fewer than ``max_concurrent`` run
    (no worker tasks waiting on a queue: a free slot starts the id in the same loop
    pass as ``put``); the rest wait in a bounded backlog, in order.

    ``claim`` reserves a free slot (nothing waiting, one free) for a run that starts at
    once: the caller records it as running, then starts it (or releases the slot)."""

    name = "local"
    exclusive = True

    def __init__(self, max_concurrent: int, max_queue: int, retry_after: int = 1) -> None:
        self._backlog: deque[str] = deque()
        self._max_queue = max_queue
        self._max_concurrent = max_concurrent
        self._retry_after = retry_after
        self._handler: Handler | None = None
        self._running: set[asyncio.Future[None]] = set()
        self._claimed = 0

    async def start(self, handler: Handler, lost: LostHandler) -> None:
        self._handler = handler
        self._next()

    async def close(self) -> None:
        self._handler = None  # (nothing more starts)
        for task in self._running:
            task.cancel()
        await asyncio.gather(*self._running, return_exceptions=True)
        self._running.clear()

    async def put(self, execution_id: str) -> None:
        if not self._room():
            raise QueueFull(
                f"the queue is full ({self._max_queue} executions waiting); retry later",
                retry_after=self._retry_after,
            )
        self._backlog.append(execution_id)
        self._next()

    def claim(self) -> _Claim | None:
        """A reserved slot when one is free and no id waits (nothing is overtaken)."""
        if self._backlog or not self._free():
            return None
        self._claimed += 1
        return _Claim(self)

    async def depth(self) -> int:
        return len(self._backlog)

    async def full(self) -> bool:
        return not self._room()

    def _room(self) -> bool:
        """``put`` takes one more: it starts at once, or there is room to wait."""
        return (not self._backlog and self._free()) or len(self._backlog) < self._max_queue

    def _free(self) -> bool:
        return self._handler is not None and (
            len(self._running) + self._claimed < self._max_concurrent
        )

    def _next(self) -> None:
        while self._backlog and self._free():
            self._run(self._backlog.popleft())

    def _run(self, execution_id: str) -> None:
        if self._handler is None:  # a claim used after ``close``: it stays unstarted
            self._backlog.appendleft(execution_id)
            return
        task = asyncio.ensure_future(self._handler(execution_id))
        self._running.add(task)
        task.add_done_callback(self._ended)

    def _ended(self, task: asyncio.Future[None]) -> None:
        self._running.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("a run's handler failed", error=repr(task.exception()))
        self._next()


class _Claim:
    def __init__(self, queue: LocalQueue) -> None:
        self._queue: LocalQueue | None = queue

    def start(self, execution_id: str) -> None:
        queue = self._give_back()
        queue._run(execution_id)

    def release(self) -> None:
        self._give_back()._next()

    def _give_back(self) -> LocalQueue:
        queue, self._queue = self._queue, None
        if queue is None:
            raise RuntimeError("a claim is used once")
        queue._claimed -= 1
        return queue


class LocalBus:
    """Everything runs in this process: kills, finishes and output never leave it."""

    async def start(self, on_kill: Signal, on_finished: Signal) -> None:
        pass

    async def close(self) -> None:
        pass

    async def publish_kill(self, execution_id: str) -> None:
        pass

    async def publish_finished(self, execution_id: str) -> None:
        pass

    async def publish_output(self, execution_id: str, capture: OutputCapture) -> None:
        pass

    def follow_output(
        self, execution_id: str, finished: IsFinished
    ) -> AsyncIterator[LogEvent] | None:
        return None

    async def ship_project(self, execution_id: str, job: Job) -> bool:
        return False

    async def fetch_project(self, execution_id: str, job: Job, staging: Path) -> Job:
        return job

    async def drop_project(self, execution_id: str) -> None:
        pass
