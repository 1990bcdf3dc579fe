"""In-process state store: a dict behind an asyncio lock. Nothing survives a restart.

Usage::

    store = MemoryStore()
    await store.open()
"""

from __future__ import annotations

import asyncio
import builtins
from collections.abc import Collection
from datetime import datetime

from python_executor_client.models import ExecutionStatus

from .base import FINISHED, UNFINISHED, DuplicateExecution, ExecutionRecord, utcnow
from .codec import check_same_id, check_times, decode_cursor, encode_cursor, sort_key


def _position(record: ExecutionRecord) -> str:
    return sort_key(record.created_at, record.execution_id)


class MemoryStore:
    name = "memory"
    in_process = True  # (its lock is never held across a suspension)

    def __init__(self) -> None:
        self._records: dict[str, ExecutionRecord] = {}
        self._lock = asyncio.Lock()

    async def open(self) -> None:
        return None

    async def close(self) -> None:
        return None

    async def create(self, record: ExecutionRecord) -> None:
        check_times(record)
        async with self._lock:
            if record.execution_id in self._records:
                raise DuplicateExecution(f"execution {record.execution_id} already exists")
            self._records[record.execution_id] = record

    async def get(self, execution_id: str) -> ExecutionRecord | None:
        async with self._lock:
            return self._records.get(execution_id)

    async def transition(
        self, execution_id: str, expected: Collection[ExecutionStatus], record: ExecutionRecord
    ) -> bool:
        check_same_id(execution_id, record)
        check_times(record)
        async with self._lock:
            current = self._records.get(execution_id)
            if current is None or current.status not in expected:
                return False
            self._records[execution_id] = record
            return True

    async def list(
        self, status: ExecutionStatus | None, limit: int, cursor: str | None
    ) -> tuple[builtins.list[ExecutionRecord], str | None]:
        if limit < 1:
            raise ValueError(f"limit must be positive, got {limit}")
        after = decode_cursor(cursor) if cursor is not None else None
        async with self._lock:
            records = [r for r in self._records.values() if status is None or r.status == status]
        if after is not None:
            records = [r for r in records if _position(r) < after]
        records.sort(key=_position, reverse=True)
        page = records[:limit]
        if len(records) <= limit:
            return page, None
        return page, encode_cursor(page[-1].created_at, page[-1].execution_id)

    async def fail_unfinished(self, error: str) -> builtins.list[str]:
        now = utcnow()
        async with self._lock:
            ids = [i for i, r in self._records.items() if r.status in UNFINISHED]
            for i in ids:
                self._records[i] = self._records[i].evolve(
                    status=ExecutionStatus.FAILED, error=error, finished_at=now
                )
        return ids

    async def delete_finished_before(self, cutoff: datetime) -> builtins.list[str]:
        async with self._lock:
            ids = [i for i, r in self._records.items() if _expired(r, cutoff)]
            for i in ids:
                del self._records[i]
        return ids

    async def count(self, status: ExecutionStatus) -> int:
        async with self._lock:
            return sum(1 for r in self._records.values() if r.status == status)


def _expired(record: ExecutionRecord, cutoff: datetime) -> bool:
    finished_at = record.finished_at
    return record.status in FINISHED and finished_at is not None and finished_at < cutoff
