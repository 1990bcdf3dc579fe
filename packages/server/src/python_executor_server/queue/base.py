"""The job-queue seam: who runs which execution, and with how much concurrency.

A queue takes execution ids (``put``) and calls the handler given to ``start``
for each, with at most ``max_concurrent`` handlers running at once. ``put``
raises ``QueueFull`` when the backlog is at its bound, so a caller can answer
503 instead of piling work up.

Usage::

    await queue.start(service.execute)
    await queue.put("exe_...")
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Protocol

Handler = Callable[[str], Awaitable[None]]


class JobQueue(Protocol):
    name: str

    async def start(self, handler: Handler) -> None: ...

    async def close(self) -> None: ...

    async def put(self, execution_id: str) -> None:
        """Enqueue; raises ``errors.QueueFull`` when the backlog is full."""

    def depth(self) -> int:
        """Executions waiting (not yet handed to a worker)."""

    def full(self) -> bool: ...
