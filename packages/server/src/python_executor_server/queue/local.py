"""In-process queue: a bounded backlog and a fixed number of worker tasks."""

from __future__ import annotations

import asyncio
import contextlib

from ..errors import QueueFull
from .base import Handler


class LocalQueue:
    name = "local"

    def __init__(self, max_concurrent: int, max_queue: int, retry_after: int = 1) -> None:
        self._backlog: asyncio.Queue[str] = asyncio.Queue(maxsize=max_queue)
        self._max_concurrent = max_concurrent
        self._retry_after = retry_after
        self._workers: list[asyncio.Task[None]] = []
        self._idle = 0

    async def start(self, handler: Handler) -> None:
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

    def depth(self) -> int:
        return self._backlog.qsize()

    def full(self) -> bool:
        return self._backlog.full()
