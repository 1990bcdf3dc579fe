"""The state-store seam: where execution records live.

Every store (memory, sqlite, redis, ...) implements ``StateStore`` and passes
the same contract suite (``tests/contract/test_store_contract.py``).

Status changes go through ``transition``: a compare-and-set on the status, so
that two actors (a worker finishing, a DELETE killing) cannot both win. Which
transitions are legal is decided in ``execution/states.py``, not here.

Usage::

    await store.create(ExecutionRecord.new(request={"code": "print(1)"}))
    ok = await store.transition(rec.execution_id, {PENDING}, replace(rec, status=RUNNING))
"""

from __future__ import annotations

import builtins
import uuid
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any, Protocol

from python_executor_client.models import ExecutionResult, ExecutionStatus, ExecutionUsage

from ..errors import ExecutorError

UNFINISHED = frozenset({ExecutionStatus.PENDING, ExecutionStatus.RUNNING})
FINISHED = frozenset(s for s in ExecutionStatus if s.finished)


class DuplicateExecution(ExecutorError):
    """``create`` was given an id that is already stored (a bug: ids are uuid4)."""


class StoreUnavailable(ExecutorError):
    """The configured store cannot be used: unknown, not installed, unreachable."""


def utcnow() -> datetime:
    return datetime.now(UTC)


def new_execution_id() -> str:
    return f"exe_{uuid.uuid4()}"


@dataclass(frozen=True)
class ExecutionRecord:
    execution_id: str
    status: ExecutionStatus
    created_at: datetime
    request: Mapping[str, Any] = field(default_factory=dict)  # normalized job, JSON-able
    stdout: str = ""
    stderr: str = ""
    exit_code: int | None = None
    error: str | None = None
    error_type: str | None = None
    error_line: int | None = None
    result: str | None = None
    started_at: datetime | None = None
    finished_at: datetime | None = None
    duration_ms: int | None = None
    stdout_truncated: bool = False
    stderr_truncated: bool = False
    cpu_ms: int | None = None
    peak_memory_mb: float | None = None

    @classmethod
    def new(
        cls, request: Mapping[str, Any], execution_id: str | None = None, *, running: bool = False
    ) -> ExecutionRecord:
        """A pending record; ``running``: one that starts now (never pending)."""
        now = utcnow()
        return cls(
            execution_id=execution_id or new_execution_id(),
            status=ExecutionStatus.RUNNING if running else ExecutionStatus.PENDING,
            created_at=now,
            request=dict(request),
            started_at=now if running else None,
        )

    def evolve(self, **changes: Any) -> ExecutionRecord:
        return replace(self, **changes)

    def to_result(self) -> ExecutionResult:
        usage = None
        if self.cpu_ms is not None or self.peak_memory_mb is not None:
            usage = ExecutionUsage(cpu_ms=self.cpu_ms, peak_memory_mb=self.peak_memory_mb)
        return ExecutionResult(
            execution_id=self.execution_id,
            status=self.status,
            stdout=self.stdout,
            stderr=self.stderr,
            exit_code=self.exit_code,
            error=self.error,
            error_type=self.error_type,
            error_line=self.error_line,
            result=self.result,
            started_at=self.started_at,
            finished_at=self.finished_at,
            duration_ms=self.duration_ms,
            stdout_truncated=self.stdout_truncated,
            stderr_truncated=self.stderr_truncated,
            usage=usage,
        )


class StateStore(Protocol):
    name: str
    # True: every call is done on the event loop without suspending (nothing else runs
    # between a write's start and its end): a sync run may be answered before its last
    # write (``ExecutionService._finish``). False: a call waits on the network.
    in_process: bool

    async def open(self) -> None:
        """Connect / create the schema. Called once at start-up."""

    async def close(self) -> None: ...

    async def create(self, record: ExecutionRecord) -> None:
        """Insert a new record; an id that exists raises ``DuplicateExecution``."""

    async def get(self, execution_id: str) -> ExecutionRecord | None: ...

    async def transition(
        self, execution_id: str, expected: Collection[ExecutionStatus], record: ExecutionRecord
    ) -> bool:
        """Replace the record only if its stored status is in ``expected``; True if replaced.

        ``record`` is the stored one evolved: its id, ``created_at`` and ``request`` are
        the creation's (``codec.FIXED_FIELDS``), which a store need not write again."""

    async def list(
        self, status: ExecutionStatus | None, limit: int, cursor: str | None
    ) -> tuple[builtins.list[ExecutionRecord], str | None]:
        """Newest first (by created_at, then id). Returns the page and the next cursor.

        The cursor is opaque and positional: the next page starts right after the
        last record returned, whatever was inserted or deleted meanwhile. It is
        None after the last page; a malformed cursor raises ``BadRequest``.
        """

    async def fail_unfinished(self, error: str) -> builtins.list[str]:
        """Mark every pending/running record failed with ``error`` (start-up recovery)."""

    async def delete_finished_before(self, cutoff: datetime) -> builtins.list[str]:
        """Delete finished records whose finished_at is before ``cutoff``; return their ids."""

    async def count(self, status: ExecutionStatus) -> int: ...
