"""ExecutionService: the one orchestrator of the execution lifecycle.

Front doors (HTTP routes, the MCP tools, a queue worker) call this and
nothing else. Every status change goes through ``_transition``, which checks
it against ``states`` and applies it with a compare-and-set in the store.

Usage::

    service = ExecutionService(settings, store, queue, runner, builder)
    await service.start()
    record = await service.run_sync(job, execution_id)
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path

import structlog
from python_executor_client.models import ExecutionStatus

from ..errors import InvalidTransition, NotFound, QueueFull
from ..queue.base import JobQueue
from ..settings import Settings
from ..store.base import ExecutionRecord, StateStore, utcnow
from . import states
from .jobs import Job
from .metrics import Metrics
from .output import LogEvent, OutputCapture
from .runner import Runner, RunReport

log = structlog.get_logger("python_executor.service")


class ExecutionService:
    def __init__(
        self,
        settings: Settings,
        store: StateStore,
        queue: JobQueue,
        runner: Runner,
        metrics: Metrics,
    ) -> None:
        self.settings = settings
        self.store = store
        self.queue = queue
        self.runner = runner
        self.metrics = metrics
        self._live: dict[str, OutputCapture] = {}
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._finished: dict[str, asyncio.Event] = {}
        self._killing: set[str] = set()
        self._retention: asyncio.Task[None] | None = None

    # --- start / stop -------------------------------------------------------
    async def start(self) -> None:
        await self.store.open()
        interrupted = await self.store.fail_unfinished("server restarted")
        if interrupted:
            log.warning("failed executions interrupted by a restart", count=len(interrupted))
        await asyncio.to_thread(shutil.rmtree, self.uploads_dir, True)
        self.uploads_dir.mkdir(parents=True, exist_ok=True)
        await self.queue.start(self.execute)
        self._retention = asyncio.create_task(self._retention_loop(), name="retention")

    async def close(self) -> None:
        if self._retention is not None:
            self._retention.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._retention
        for task in list(self._tasks.values()):
            task.cancel()
        await asyncio.gather(*self._tasks.values(), return_exceptions=True)
        await self.queue.close()
        await self.store.close()

    @property
    def uploads_dir(self) -> Path:
        return self.settings.data_dir / "uploads"

    def staging_dir(self, execution_id: str) -> Path:
        return self.uploads_dir / execution_id

    # --- submit / wait ------------------------------------------------------
    async def submit(self, job: Job, execution_id: str | None = None) -> ExecutionRecord:
        """Record a pending execution and enqueue it; 503 when the queue is full."""
        if self.queue.full():
            self._discard_staging(execution_id)
            raise QueueFull("the queue is full; retry later", self.settings.retry_after_seconds)
        record = ExecutionRecord.new(job.to_dict(), execution_id)
        self._finished[record.execution_id] = asyncio.Event()
        await self.store.create(record)
        try:
            await self.queue.put(record.execution_id)
        except QueueFull:
            await self._finish(
                record, RunReport(states.FAILED, error="rejected: the queue was full")
            )
            raise
        self.metrics.submitted.inc()
        return record

    async def run_sync(self, job: Job, execution_id: str | None = None) -> ExecutionRecord:
        record = await self.submit(job, execution_id)
        return await self.wait(record.execution_id)

    async def wait(self, execution_id: str) -> ExecutionRecord:
        """The record once it is finished."""
        event = self._finished.get(execution_id)
        if event is not None:
            await event.wait()
        else:
            await self._poll_until_finished(execution_id)
        return await self.get(execution_id)

    async def _poll_until_finished(self, execution_id: str) -> None:
        # Another process may be running it: the store is the only shared truth.
        while not (await self.get(execution_id)).status.finished:  # noqa: ASYNC110
            await asyncio.sleep(0.1)

    # --- queries ------------------------------------------------------------
    async def get(self, execution_id: str) -> ExecutionRecord:
        record = await self.store.get(execution_id)
        if record is None:
            raise NotFound(f"execution {execution_id!r} not found")
        return record

    async def list(
        self, status: ExecutionStatus | None, limit: int, cursor: str | None
    ) -> tuple[list[ExecutionRecord], str | None]:
        return await self.store.list(status, limit, cursor)

    def running_count(self) -> int:
        return len(self._live)

    # --- kill ---------------------------------------------------------------
    async def kill(self, execution_id: str) -> ExecutionStatus:
        """Stop a pending or running execution; returns the status it ends with."""
        record = await self.get(execution_id)
        if record.status == states.PENDING:
            if await self._transition(record, states.KILLED, finished_at=utcnow()):
                self._finished_event(execution_id)
                return states.KILLED
            record = await self.get(execution_id)
        task = self._tasks.get(execution_id)
        if record.status == states.RUNNING and task is not None:
            self._killing.add(execution_id)
            task.cancel()
            await asyncio.wait([task], timeout=5)
            return (await self.get(execution_id)).status
        return record.status

    # --- live output --------------------------------------------------------
    async def follow(self, execution_id: str) -> AsyncIterator[LogEvent | ExecutionRecord]:
        """Output events as they are produced, then the final record."""
        record = await self.get(execution_id)
        while record.status == states.PENDING and execution_id not in self._live:
            await asyncio.sleep(0.05)
            record = await self.get(execution_id)
        capture = self._live.get(execution_id)
        if capture is not None:
            queue = capture.subscribe()
            try:
                while (event := await queue.get()) is not None:
                    yield event
            finally:
                capture.unsubscribe(queue)
            yield await self.wait(execution_id)
            return
        record = await self.wait(execution_id)
        for stream in ("stdout", "stderr"):
            text = getattr(record, stream)
            if text:
                yield LogEvent(stream, text)
        yield record

    # --- the worker side ----------------------------------------------------
    async def execute(self, execution_id: str) -> None:
        """Queue handler: run one execution in its own task (so a kill cancels only it)."""
        task = asyncio.create_task(self._execute(execution_id), name=execution_id)
        self._tasks[execution_id] = task
        try:
            await asyncio.shield(task)
        except asyncio.CancelledError:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            raise
        finally:
            self._tasks.pop(execution_id, None)

    async def _execute(self, execution_id: str) -> None:
        record = await self.store.get(execution_id)
        if record is None or record.status != states.PENDING:
            self._discard_staging(execution_id)
            return
        running = record.evolve(status=states.RUNNING, started_at=utcnow())
        if not await self._transition(record, states.RUNNING, started_at=running.started_at):
            self._discard_staging(execution_id)
            return
        self.metrics.running.inc()
        capture = OutputCapture(self.settings.output_cap_bytes)
        self._live[execution_id] = capture
        logger = log.bind(execution_id=execution_id)
        logger.info("execution started")
        try:
            report = await self.runner.run(execution_id, Job.from_dict(record.request), capture)
        except asyncio.CancelledError:
            report = self._cancelled(execution_id)
        except Exception as exc:  # a bug or a broken sandbox: never leave it running
            logger.exception("execution crashed")
            report = RunReport(states.FAILED, error=f"internal error: {exc}")
        finally:
            self.metrics.running.dec()
            self._live.pop(execution_id, None)
            capture.close()
            self._discard_staging(execution_id)
        final = await self._finish(running, report, capture)
        logger.info("execution finished", status=final.status.value, exit_code=final.exit_code)

    def _cancelled(self, execution_id: str) -> RunReport:
        task = asyncio.current_task()
        if execution_id in self._killing:
            self._killing.discard(execution_id)
            if task is not None:
                task.uncancel()
            return RunReport(states.KILLED, error="killed by request")
        return RunReport(states.FAILED, error="server shutting down")

    async def _finish(
        self, running: ExecutionRecord, report: RunReport, capture: OutputCapture | None = None
    ) -> ExecutionRecord:
        finished_at = utcnow()
        started = running.started_at or finished_at
        changes = dict(
            exit_code=report.exit_code,
            error=report.error,
            error_type=report.error_type,
            error_line=report.error_line,
            result=report.result,
            finished_at=finished_at,
            duration_ms=int((finished_at - started).total_seconds() * 1000),
            cpu_ms=report.cpu_ms,
            peak_memory_mb=report.peak_memory_mb,
        )
        if capture is not None:
            changes.update(
                stdout=capture.text("stdout"),
                stderr=capture.text("stderr"),
                stdout_truncated=capture.truncated("stdout"),
                stderr_truncated=capture.truncated("stderr"),
            )
        with contextlib.suppress(InvalidTransition):
            await self._transition(running, report.status, **changes)
        self.metrics.finished.labels(status=report.status.value).inc()
        self._finished_event(running.execution_id)
        return await self.get(running.execution_id)

    async def _transition(
        self, record: ExecutionRecord, target: ExecutionStatus, **changes: object
    ) -> bool:
        sources = states.allowed_from(target)
        if record.status not in sources:
            raise InvalidTransition(f"{record.status.value} → {target.value} is not allowed")
        return await self.store.transition(
            record.execution_id, sources, record.evolve(status=target, **changes)
        )

    def _finished_event(self, execution_id: str) -> None:
        event = self._finished.pop(execution_id, None)
        if event is not None:
            event.set()

    def _discard_staging(self, execution_id: str | None) -> None:
        if execution_id is not None:
            shutil.rmtree(self.staging_dir(execution_id), ignore_errors=True)

    async def _retention_loop(self) -> None:
        interval = max(1, min(self.settings.cleanup_ttl, 300))
        while True:
            await asyncio.sleep(interval)
            cutoff = utcnow() - timedelta(seconds=self.settings.cleanup_ttl)
            removed = await self.store.delete_finished_before(cutoff)
            for execution_id in removed:
                await self.runner.discard_workspace(execution_id)
            if removed:
                log.info("retention removed finished executions", count=len(removed))
