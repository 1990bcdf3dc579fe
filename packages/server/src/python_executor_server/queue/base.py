"""The job-queue seam, and the bus that carries everything else between nodes.

A ``JobQueue`` takes execution ids (``put``) and calls the handler given to
``start`` for each, with at most ``max_concurrent`` handlers running at once
on a node that runs workers. ``put`` raises ``QueueFull`` when the backlog is
at its bound, so a caller can answer 503 instead of piling work up. A shared
queue may find ids that a vanished node had taken: it asks ``lost`` what to
do with each (True: queue it again, it never started).

A ``Bus`` carries what else must cross between nodes: kills, "finished"
notices, live output and exec projects. In one process (``LocalBus``) there
is nothing to carry; ``RedisBus`` carries it over Redis.

Usage::

    await bus.start(on_kill=service.cancel_local, on_finished=service.notify_local)
    await queue.start(service.execute, service.lost)
    await queue.put("exe_...")
    claim = queue.claim()                   # a local queue with a free slot: run at once
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from ..errors import ExecutorError

if TYPE_CHECKING:
    from ..execution.jobs import Job
    from ..execution.output import LogEvent, OutputCapture

Handler = Callable[[str], Awaitable[None]]
LostHandler = Callable[[str], Awaitable[bool]]
Signal = Callable[[str], object]
IsFinished = Callable[[], Awaitable[bool]]


class QueueUnavailable(ExecutorError):
    """The configured queue cannot be used: a wrong combination of settings, not installed."""


class JobQueue(Protocol):
    name: str
    exclusive: bool  # True: this process is the only one running the store's executions

    async def start(self, handler: Handler, lost: LostHandler) -> None: ...

    async def close(self) -> None: ...

    async def put(self, execution_id: str) -> None:
        """Enqueue; raises ``errors.QueueFull`` when the backlog is full."""

    async def depth(self) -> int:
        """Executions waiting (not yet handed to a worker)."""

    async def full(self) -> bool: ...

    def claim(self) -> Claim | None:
        """A slot for a run that starts at once, so that its caller records it as running
        (one store write, no wait in the queue); None: ``put`` it. Only a queue whose
        runs all happen in this process grants one."""


class Claim(Protocol):
    def start(self, execution_id: str) -> None:
        """Run it now (its record exists, as running)."""

    def release(self) -> None:
        """Give the slot back unused."""


class Bus(Protocol):
    async def start(self, on_kill: Signal, on_finished: Signal) -> None:
        """Call ``on_kill(id)`` / ``on_finished(id)`` for kills and finishes on any node."""

    async def close(self) -> None: ...

    async def publish_kill(self, execution_id: str) -> None: ...

    async def publish_finished(self, execution_id: str) -> None: ...

    async def publish_output(self, execution_id: str, capture: OutputCapture) -> None:
        """Forward everything ``capture`` gets to followers on other nodes, until it closes."""

    def follow_output(
        self, execution_id: str, finished: IsFinished
    ) -> AsyncIterator[LogEvent] | None:
        """The run's output from its start, live; None when this bus carries no output."""

    async def ship_project(self, execution_id: str, job: Job) -> bool:
        """Make the job's project reachable from any node (413 when too large).

        True when the bus now holds a copy, so the caller's local one may go.
        """

    async def fetch_project(self, execution_id: str, job: Job, staging: Path) -> Job:
        """The job with its project files present on this node (under ``staging``)."""

    async def drop_project(self, execution_id: str) -> None: ...
