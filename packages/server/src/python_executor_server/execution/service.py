"""ExecutionService: the one orchestrator of the execution lifecycle.

Front doors (HTTP routes, the MCP tools, a queue worker) call this and
nothing else. Every status change goes through ``_transition``, which checks
it against ``states`` and applies it with a compare-and-set in the store.

The same service runs on every node. With the local queue everything happens
in this process. With the Redis queue an API node records and enqueues, a
worker node (``python-executor-server worker``) takes and runs, and the
``Bus`` carries the rest between them: kills reach the node running the
execution, finishes wake waiters on every node (which also re-read the store
every second), output is streamed to followers anywhere, and exec projects
travel from the API node to the worker.

Usage::

    service = ExecutionService(settings, store, queue, runner, builder)
    await service.start()
    record = await service.run_sync(job, execution_id)
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import shutil
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path

import structlog
from python_executor_client.models import ExecutionStatus

from ..errors import ExecutorError, InvalidTransition, NotFound, QueueFull
from ..queue.base import Bus, Claim, JobQueue
from ..queue.local import LocalBus
from ..settings import Settings
from ..store.base import ExecutionRecord, StateStore, new_execution_id, utcnow
from . import states
from .jobs import Job
from .metrics import Metrics
from .output import STREAMS, LogEvent, OutputCapture
from .runner import Runner, RunReport

log = structlog.get_logger("python_executor.service")

POLL_SECONDS = 1.0  # waiters re-read the store this often, in case a finish notice was lost
KILL_ATTEMPTS = 5  # a kill is re-sent each second until the record is finished
WORKER_LOST = "worker lost: the node running it stopped before it finished"


class ExecutionService:
    def __init__(
        self,
        settings: Settings,
        store: StateStore,
        queue: JobQueue,
        runner: Runner,
        metrics: Metrics,
        bus: Bus | None = None,
    ) -> None:
        self.settings = settings
        self.store = store
        self.queue = queue
        self.runner = runner
        self.metrics = metrics
        self.bus: Bus = bus if bus is not None else LocalBus()
        self._live: dict[str, OutputCapture] = {}
        self._tasks: dict[str, asyncio.Task[None]] = {}
        # A waiter gets the finished record when it finished here, None when told by the bus.
        self._waiters: dict[str, set[asyncio.Future[ExecutionRecord | None]]] = {}
        # Submitted here, for this process's own queue: its worker need not read them back.
        self._submitted: dict[str, tuple[ExecutionRecord, Job]] = {}
        self._killing: set[str] = set()
        self._retention: asyncio.Task[None] | None = None
        self._uploads = settings.data_dir / "uploads"

    # --- start / stop -------------------------------------------------------
    async def start(self) -> None:
        await self.store.open()
        try:
            await self._start_after_store()
        except BaseException:
            # A half-started node must still exit: the store's thread would keep it alive.
            await self.store.close()
            raise

    async def _start_after_store(self) -> None:
        if self.queue.exclusive:
            # Only this process runs this store's executions: unfinished ones died with it.
            # (A shared queue settles a dead node's executions itself: see ``lost``.)
            interrupted = await self.store.fail_unfinished("server restarted")
            if interrupted:
                log.warning("failed executions interrupted by a restart", count=len(interrupted))
        await asyncio.to_thread(shutil.rmtree, self.uploads_dir, True)
        self.uploads_dir.mkdir(parents=True, exist_ok=True)
        await self.bus.start(on_kill=self.cancel_local, on_finished=self.notify_local)
        await self.queue.start(self.execute, self.lost)
        self._retention = asyncio.create_task(self._retention_loop(), name="retention")

    async def close(self) -> None:
        if self._retention is not None:
            self._retention.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._retention
        await self.queue.close()  # takes no more work; cancels the runs it handed out
        for task in list(self._tasks.values()):
            task.cancel()
        await asyncio.gather(*self._tasks.values(), return_exceptions=True)
        await self.bus.close()
        await self.store.close()

    @property
    def uploads_dir(self) -> Path:
        return self._uploads

    def staging_dir(self, execution_id: str) -> Path:
        return self._uploads / execution_id

    # --- submit / wait ------------------------------------------------------
    async def submit(self, job: Job, execution_id: str | None = None) -> ExecutionRecord:
        """Record a pending execution and enqueue it; 503 when the queue is full. One
        that a free slot of this process's queue starts at once is recorded as running
        (one store write, not two, and no wait in the queue)."""
        if await self.queue.full():
            self._discard_staging(execution_id)
            raise QueueFull("the queue is full; retry later", self.settings.retry_after_seconds)
        claim = self.queue.claim()
        try:
            record = await self._record(job, execution_id, claim)
        except BaseException:
            if claim is not None:
                claim.release()
            raise
        if claim is not None:
            claim.start(record.execution_id)
            self.metrics.submitted.inc()
            return record
        try:
            await self.queue.put(record.execution_id)
        except QueueFull:
            self._submitted.pop(record.execution_id, None)
            self._discard_staging(record.execution_id)
            await self.bus.drop_project(record.execution_id)
            await self._finish(
                record, RunReport(states.FAILED, error="rejected: the queue was full")
            )
            raise
        self.metrics.submitted.inc()
        return record

    async def _record(
        self, job: Job, execution_id: str | None, claim: Claim | None
    ) -> ExecutionRecord:
        record = ExecutionRecord.new(job.to_dict(), execution_id, running=claim is not None)
        try:
            # Once the bus holds the project, the local copy goes, before any local worker
            # could unpack the bus's copy into the same staging dir.
            if await self.bus.ship_project(record.execution_id, job):
                self._discard_staging(record.execution_id)
        except BaseException:
            self._discard_staging(record.execution_id)
            raise
        await self.store.create(record)
        if self.queue.exclusive:
            self._submitted[record.execution_id] = (record, job)
        return record

    async def run_sync(self, job: Job, execution_id: str | None = None) -> ExecutionRecord:
        execution_id = execution_id or new_execution_id()
        waiter = self._add_waiter(execution_id)  # before submitting: no finish slips past it
        try:
            await self.submit(job, execution_id)
            finished = await _finished_within(waiter, POLL_SECONDS)
            if finished is not None:  # it finished here: the record as stored, no need to read
                return finished
        finally:
            self._drop_waiter(execution_id, waiter)
        return await self.wait(execution_id)

    async def wait(self, execution_id: str) -> ExecutionRecord:
        """The record once it is finished, wherever it runs.

        Woken by a finish on this node or (through the bus) on another; the store
        is re-read every ``POLL_SECONDS`` anyway, as the only shared truth.
        """
        while True:
            waiter = self._add_waiter(execution_id)  # before reading: no finish slips between
            try:
                record = await self.get(execution_id)
                if record.status.finished:
                    return record
                finished = await _finished_within(waiter, POLL_SECONDS)
                if finished is not None:
                    return finished
            finally:
                self._drop_waiter(execution_id, waiter)

    def _add_waiter(self, execution_id: str) -> asyncio.Future[ExecutionRecord | None]:
        waiter: asyncio.Future[ExecutionRecord | None] = asyncio.get_running_loop().create_future()
        self._waiters.setdefault(execution_id, set()).add(waiter)
        return waiter

    def _drop_waiter(
        self, execution_id: str, waiter: asyncio.Future[ExecutionRecord | None]
    ) -> None:
        waiters = self._waiters.get(execution_id)
        if waiters is not None:
            waiters.discard(waiter)
            if not waiters:
                del self._waiters[execution_id]

    def notify_local(self, execution_id: str, finished: ExecutionRecord | None = None) -> None:
        """Wake this node's waiters for ``execution_id`` (also the bus's finish handler),
        with the finished record when this node wrote it (else they read the store)."""
        for waiter in self._waiters.pop(execution_id, ()):
            if not waiter.done():
                waiter.set_result(finished)

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
            killed = await self._transition(record, states.KILLED, finished_at=utcnow())
            if killed is not None:
                await self.bus.drop_project(execution_id)
                await self._announce_finished(execution_id, killed)
                return states.KILLED
            record = await self.get(execution_id)
        if record.status == states.RUNNING:
            return await self._kill_running(execution_id)
        return record.status

    async def _kill_running(self, execution_id: str) -> ExecutionStatus:
        """Cancel it here, or ask the node that runs it (again each second, for 5 s)."""
        for _ in range(KILL_ATTEMPTS):
            if not self.cancel_local(execution_id):
                await self.bus.publish_kill(execution_id)
            with contextlib.suppress(TimeoutError):
                return (await asyncio.wait_for(self.wait(execution_id), 1)).status
        return (await self.get(execution_id)).status

    def cancel_local(self, execution_id: str) -> bool:
        """Cancel the run if this node runs it (also the bus's kill handler); True if it does."""
        task = self._tasks.get(execution_id)
        if task is None:
            return False
        # Cancel once, and not once the run is over: that would hit _finish or the cleanup.
        if execution_id not in self._killing:
            self._killing.add(execution_id)
            task.cancel()
        return True

    # --- live output --------------------------------------------------------
    async def follow(self, execution_id: str) -> AsyncIterator[LogEvent | ExecutionRecord]:
        """Output events from the start, as they are produced, then the final record.

        Whatever the live stream did not deliver (it finished before we could
        follow it, its node died) is sent from the final record.
        """
        record = await self.get(execution_id)
        seen: dict[str, list[str]] = {stream: [] for stream in STREAMS}
        if not record.status.finished:
            async for event in self._live_output(execution_id):
                seen[event.stream].append(event.text)
                yield event
            record = await self.wait(execution_id)
        for stream in STREAMS:
            rest = _unseen(getattr(record, stream), "".join(seen[stream]))
            if rest:
                yield LogEvent(stream, rest)
        yield record

    def _live_output(self, execution_id: str) -> AsyncIterator[LogEvent]:
        finished = functools.partial(self._is_finished, execution_id)
        remote = self.bus.follow_output(execution_id, finished)
        return remote if remote is not None else self._local_output(execution_id)

    async def _local_output(self, execution_id: str) -> AsyncIterator[LogEvent]:
        record = await self.get(execution_id)
        while record.status == states.PENDING and execution_id not in self._live:
            await asyncio.sleep(0.05)
            record = await self.get(execution_id)
        capture = self._live.get(execution_id)
        if capture is None:
            return
        queue = capture.subscribe()
        try:
            while (event := await queue.get()) is not None:
                yield event
        finally:
            capture.unsubscribe(queue)

    async def _is_finished(self, execution_id: str) -> bool:
        return (await self.get(execution_id)).status.finished

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
            self._killing.discard(execution_id)

    async def _execute(self, execution_id: str) -> None:
        record, job = self._submitted.pop(execution_id, (None, None))
        if record is not None and record.status == states.RUNNING:
            running: ExecutionRecord | None = record  # submitted as running: a claimed slot
        else:
            if record is None:  # submitted on another node: the store has it
                record = await self.store.get(execution_id)
            # A kill while it waited changed the stored status: the compare-and-set fails.
            running = None if record is None else await self._start(record)
        if running is None:
            await self._abandon(execution_id)
            return
        # The run's workspace goes once the record is finished and its waiter answered.
        async with contextlib.AsyncExitStack() as cleanup:
            final = await self._run_to_finish(running, job, cleanup)
            await asyncio.sleep(0)  # the woken waiter sends its response before the cleanup
        log.info(
            "execution finished",
            execution_id=execution_id,
            status=final.status.value,
            exit_code=final.exit_code,
            duration_ms=final.duration_ms,
        )

    async def _run_to_finish(
        self, running: ExecutionRecord, job: Job | None, cleanup: contextlib.AsyncExitStack
    ) -> ExecutionRecord:
        execution_id = running.execution_id
        self.metrics.running.inc()
        capture = OutputCapture(self.settings.output_cap_bytes)
        self._live[execution_id] = capture
        publishing = asyncio.create_task(self.bus.publish_output(execution_id, capture))
        log.debug("execution started", execution_id=execution_id)  # info: only its finish
        try:
            job = job or Job.from_dict(running.request)
            report = await self._run(execution_id, job, capture, cleanup)
        except asyncio.CancelledError:
            report = self._cancelled(execution_id)
        except Exception as exc:  # a bug or a broken sandbox: never leave it running
            log.exception("execution crashed", execution_id=execution_id)
            report = RunReport(states.FAILED, error=f"internal error: {exc}")
        finally:
            self.metrics.running.dec()
            self._live.pop(execution_id, None)
            capture.close()
            if job is None or job.project_dir is not None:  # an eval's never had one
                self._discard_staging(execution_id)
        self._killing.add(execution_id)  # the run is over: a late kill has nothing to stop
        await _settle(publishing)
        return await self._finish(running, report, capture)

    async def _start(self, pending: ExecutionRecord) -> ExecutionRecord | None:
        """The record as running, or None if it is not pending any more (killed, taken)."""
        if pending.status != states.PENDING:
            return None
        return await self._transition(pending, states.RUNNING, started_at=utcnow())

    async def _run(
        self,
        execution_id: str,
        job: Job,
        capture: OutputCapture,
        cleanup: contextlib.AsyncExitStack,
    ) -> RunReport:
        try:
            job = await self.bus.fetch_project(execution_id, job, self.staging_dir(execution_id))
        except ExecutorError as exc:
            return RunReport(states.FAILED, error=exc.message)
        return await self.runner.run(execution_id, job, capture, cleanup)

    async def _abandon(self, execution_id: str) -> None:
        """Not ours to run (killed while pending, or taken twice): leave no files behind."""
        self._discard_staging(execution_id)
        record = await self.store.get(execution_id)
        if record is None or record.status.finished:
            await self.bus.drop_project(execution_id)

    def _cancelled(self, execution_id: str) -> RunReport:
        task = asyncio.current_task()
        if execution_id in self._killing:
            if task is not None:
                task.uncancel()
            return RunReport(states.KILLED, error="killed by request")
        return RunReport(states.FAILED, error="server shutting down")

    async def lost(self, execution_id: str) -> bool:
        """A node died holding this id (shared queue): True to queue it again.

        A pending one never started and runs again. A running one is failed, not
        re-run: the user's code may have had effects, or may be what killed the node.
        """
        record = await self.store.get(execution_id)
        if record is None or record.status.finished:
            return False
        if record.status == states.PENDING:
            return True
        await self._finish(record, RunReport(states.FAILED, error=WORKER_LOST))
        return False

    async def _finish(
        self, running: ExecutionRecord, report: RunReport, capture: OutputCapture | None = None
    ) -> ExecutionRecord:
        changed = running.evolve(status=report.status, **_final_changes(running, report, capture))
        if self._answer_first(running.execution_id):
            # Nothing but this task writes a running record of this process's own queue:
            # the waiting request is answered first (its response goes out in the next
            # loop pass, before this task resumes), then the record is stored, before
            # anything its client sends next is read. A sync run's answer does not wait
            # for the store's write (docs/benchmarks.md).
            self.notify_local(running.execution_id, changed)
            try:
                await asyncio.sleep(0)
            except asyncio.CancelledError:  # shutting down: the answer is out, store it
                await self._apply(running, changed)
                raise
        final = None
        with contextlib.suppress(InvalidTransition):
            final = await self._apply(running, changed)
        self.metrics.finished.labels(status=report.status.value).inc()
        if final is None:  # someone else finished it first (a kill, a lost node): theirs stands
            final = await self.get(running.execution_id)
        await self._announce_finished(running.execution_id, final)
        return final

    def _answer_first(self, execution_id: str) -> bool:
        """A request waits for this run here, only this process writes its record, and the
        store writes without suspending: no read can come between the answer and the
        write (a networked store's write would let one in)."""
        return self.queue.exclusive and self.store.in_process and execution_id in self._waiters

    async def _transition(
        self, record: ExecutionRecord, target: ExecutionStatus, **changes: object
    ) -> ExecutionRecord | None:
        """The record as stored after the change, None if the stored status did not allow it."""
        return await self._apply(record, record.evolve(status=target, **changes))

    async def _apply(
        self, record: ExecutionRecord, changed: ExecutionRecord
    ) -> ExecutionRecord | None:
        """``changed`` stored in place of ``record`` if the stored status is still one its
        status may follow (compare-and-set): ``changed``, else None."""
        target = changed.status
        sources = states.allowed_from(target)
        if record.status not in sources:
            raise InvalidTransition(f"{record.status.value} → {target.value} is not allowed")
        if await self.store.transition(record.execution_id, sources, changed):
            return changed
        return None

    async def _announce_finished(
        self, execution_id: str, finished: ExecutionRecord | None = None
    ) -> None:
        self.notify_local(execution_id, finished)
        await self.bus.publish_finished(execution_id)

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


async def _finished_within(
    waiter: asyncio.Future[ExecutionRecord | None], seconds: float
) -> ExecutionRecord | None:
    """What the waiter is woken with, or None after ``seconds``: awaited directly (not
    through ``wait_for``), so that a finish here wakes it in the very next loop pass."""
    timer = asyncio.get_running_loop().call_later(seconds, _wake, waiter)
    try:
        return await waiter
    finally:
        timer.cancel()


def _wake(waiter: asyncio.Future[ExecutionRecord | None]) -> None:
    if not waiter.done():
        waiter.set_result(None)


async def _settle(publishing: asyncio.Task[None]) -> None:
    """Let the last output reach followers on other nodes (5 s at most); never fail a run for it."""
    if publishing.done():  # always so on the local bus: no need to yield to the loop
        done = {publishing}
    else:
        done, _ = await asyncio.wait([publishing], timeout=5)
    if not done:
        publishing.cancel()
    elif not publishing.cancelled() and publishing.exception() is not None:
        log.warning("output publishing failed", error=str(publishing.exception()))


def _final_changes(
    running: ExecutionRecord, report: RunReport, capture: OutputCapture | None
) -> dict[str, object]:
    finished_at = utcnow()
    started = running.started_at or finished_at
    changes: dict[str, object] = dict(
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
    return changes


def _unseen(full: str, seen: str) -> str:
    """The part of ``full`` a follower was not sent, when what it was sent is a prefix of it."""
    return full[len(seen) :] if full.startswith(seen) else ""
