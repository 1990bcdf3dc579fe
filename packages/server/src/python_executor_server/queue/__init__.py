"""Job queues: ``local`` (in-process) and ``redis`` (many machines)."""

from __future__ import annotations

from ..settings import Settings
from .base import JobQueue


def create_queue(settings: Settings) -> JobQueue:
    if settings.queue == "local":
        from .local import LocalQueue

        return LocalQueue(settings.max_concurrent, settings.max_queue, settings.retry_after_seconds)
    raise ValueError(f"queue {settings.queue!r} is not available in this build")
