"""One node: the sandbox backend, store, queue, bus and ``ExecutionService``, started together.

``serve`` (``app.py``'s lifespan) and ``worker`` (``worker.py``) both run
one; the worker simply has no HTTP in front of it.

Usage::

    async with running_node(settings) as node:
        record = await node.service.run_sync(job)
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass

from python_executor_client.models import EvalRequest

from .execution.environments import EnvironmentCache
from .execution.interpreters import discover_interpreters
from .execution.jobs import JobBuilder
from .execution.metrics import Metrics
from .execution.runner import Runner
from .execution.service import ExecutionService
from .queue import create_bus, create_queue, node_id
from .sandbox import create_backend
from .sandbox.base import Interpreter, SandboxBackend
from .settings import Settings
from .store import create_store


@dataclass(frozen=True)
class Node:
    settings: Settings
    service: ExecutionService
    backend: SandboxBackend
    interpreters: Mapping[str, Interpreter]
    metrics: Metrics

    @property
    def node_id(self) -> str | None:
        """This node's id in the shared queue (None with the local queue)."""
        return node_id(self.settings) if self.settings.queue == "redis" else None


@asynccontextmanager
async def running_node(settings: Settings) -> AsyncIterator[Node]:
    queue, bus = create_queue(settings), create_bus(settings)  # refuses bad combinations first
    interpreters = discover_interpreters(settings)
    backend = create_backend(settings, interpreters)
    await backend.start()
    try:
        metrics = Metrics()
        runner = Runner(settings, backend, interpreters, EnvironmentCache(settings, backend))
        service = ExecutionService(settings, create_store(settings), queue, runner, metrics, bus)
        await service.start()
        try:
            # The default eval's sandboxes start now, not with the first request.
            runner.warm(JobBuilder(settings, interpreters).from_eval(EvalRequest(code="pass")))
            yield Node(settings, service, backend, interpreters, metrics)
        finally:
            await service.close()
    finally:
        await backend.close()
