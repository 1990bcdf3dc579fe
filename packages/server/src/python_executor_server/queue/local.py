"""In-process queue (a bounded backlog, a fixed number of worker tasks) and bus."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

from ..errors import QueueFull
from ..execution.jobs import Job
from ..execution.output import LogEvent, OutputCapture
from .base import Handler, IsFinished, LostHandler, Signal


class LocalQueue:
    name = "local"
    exclusive = True

    def __init__(self, max_concurrent: int, max_queue: int, retry_after: int = 1) -> None:
        self._backlog: asyncio.Queue[str] = asyncio.Queue(maxsize=max_queue)
        self._max_concurrent = max_concurrent
        self._retry_after = retry_after
        self._workers: list[asyncio.Task[None]] = []
        self._idle = 0

    async def start(self, handler: Handler, lost: LostHandler) -> None:
        self._workers = [
            asyncio.create_task(self._work(handler), name=f"worker-{n}")
            for n in range(self._max_concurrent)
        ]

    async def _work(self, handler: Handler) -> None:
        while True:
            self._idle += 1
            try:
                execution_id = await self._backlog.get()
            finally:
                self._idle -= 1
            await handler(execution_id)

    async def close(self) -> None:
        for task in self._workers:
            task.cancel()
        for task in self._workers:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._workers = []

    async def put(self, execution_id: str) -> None:
        try:
            self._backlog.put_nowait(execution_id)
        except asyncio.QueueFull:
            raise QueueFull(
                f"the queue is full ({self._backlog.maxsize} executions waiting); retry later",
                retry_after=self._retry_after,
            ) from None

    async def depth(self) -> int:
        return self._backlog.qsize()

    async def full(self) -> bool:
        return self._backlog.full()


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
