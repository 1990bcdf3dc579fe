"""Job queues and buses: ``local`` (one process) and ``redis`` (many machines).

Usage::

    check_topology(settings)          # QueueUnavailable for a combination that cannot work
    queue, bus = create_queue(settings), create_bus(settings)
"""

from __future__ import annotations

import os
import socket

from ..settings import Settings
from .base import Bus, JobQueue, QueueUnavailable

__all__ = ["Bus", "JobQueue", "QueueUnavailable", "check_topology", "create_bus", "create_queue"]


def check_topology(settings: Settings, *, worker: bool = False) -> None:
    """Refuse settings that would lose executions or never run them, with a clear reason."""
    if worker and settings.queue != "redis":
        raise QueueUnavailable(
            "`python-executor-server worker` takes executions from a shared Redis queue: "
            "set PYEXEC_QUEUE=redis and PYEXEC_STORE=redis (and PYEXEC_REDIS_URL)"
        )
    if settings.queue == "redis" and settings.store != "redis":
        raise QueueUnavailable(
            f"PYEXEC_QUEUE=redis needs PYEXEC_STORE=redis (got {settings.store!r}): "
            "workers on other machines must read and update the same records"
        )
    if settings.queue == "local" and not settings.run_workers:
        raise QueueUnavailable(
            "PYEXEC_RUN_WORKERS=false makes an API-only node, which needs PYEXEC_QUEUE=redis "
            "and worker nodes; with the local queue nothing would ever run"
        )


def node_id(settings: Settings) -> str:
    return settings.node_id or f"{socket.gethostname()}-{os.getpid()}"


def create_queue(settings: Settings) -> JobQueue:
    check_topology(settings)
    if settings.queue == "local":
        from .local import LocalQueue

        return LocalQueue(settings.max_concurrent, settings.max_queue, settings.retry_after_seconds)
    from .keys import RedisKeys
    from .redis import RedisQueue

    return RedisQueue(
        settings.redis_url,
        RedisKeys(settings.redis_namespace),
        node_id=node_id(settings),
        max_concurrent=settings.max_concurrent,
        max_queue=settings.max_queue,
        consume=settings.run_workers,
        retry_after=settings.retry_after_seconds,
        lease_seconds=settings.redis_lease_seconds,
    )


def create_bus(settings: Settings) -> Bus:
    if settings.queue == "local":
        from .local import LocalBus

        return LocalBus()
    from .bus import RedisBus
    from .keys import RedisKeys

    return RedisBus(
        settings.redis_url,
        RedisKeys(settings.redis_namespace),
        # A quiet stretch of a run can last as long as its install plus its timeout.
        output_ttl=settings.max_timeout + settings.install_timeout + 60,
        max_project_bytes=settings.redis_max_project_bytes,
        project_ttl=settings.redis_project_ttl,
        max_entries=settings.max_archive_entries,
    )
