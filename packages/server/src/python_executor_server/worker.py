"""`python-executor-server worker`: run executions from the shared Redis queue, with no HTTP.

A worker is a node like ``serve``'s (``node.py``: sandbox, store, queue, bus,
``ExecutionService``) without the API in front. It runs until SIGTERM or
SIGINT; executions it is running then end ``failed`` ("server shutting down").

Usage::

    asyncio.run(run_worker(Settings(queue="redis", store="redis")))
"""

from __future__ import annotations

import asyncio
import signal

from .logs import get_logger
from .node import running_node
from .settings import Settings

log = get_logger("python_executor.worker")


async def run_worker(settings: Settings) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with running_node(settings) as node:
        log.info(
            "worker ready",
            node=node.node_id,
            consumers=settings.max_concurrent,
            backend=node.backend.name,
            pythons=list(node.interpreters),
        )
        await stop.wait()
        log.info("worker stopping", node=node.node_id)
