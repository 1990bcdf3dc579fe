"""SQLite state store (the embedded default): one table in WAL mode.

Statements run on the event loop's thread, in autocommit mode: a write is
committed when the call returns. Each one on the execution path is a one-row
write or an indexed lookup that takes tens of microseconds, less than a hop to
a thread and back (which costs milliseconds whenever another thread holds the
GIL). What can take long stays off the loop: WAL checkpoints (they fsync) and
listings run in a thread on a second connection, and retention deletes in
batches. With WAL and ``synchronous=NORMAL`` a commit survives the process
dying at any point; only an OS crash or power loss can take back the last few.

Usage::

    store = SqliteStore(Path("data/executions.db"))
    await store.open()
"""

from __future__ import annotations

import asyncio
import builtins
import functools
import sqlite3
from collections.abc import Callable, Collection, Iterable
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar

import anyio
import structlog
from python_executor_client.models import ExecutionStatus

from .base import (
    FINISHED,
    UNFINISHED,
    DuplicateExecution,
    ExecutionRecord,
    StoreUnavailable,
    utcnow,
)
from .codec import (
    FIELDS,
    FIXED_FIELDS,
    check_same_id,
    cursor_bounds,
    encode_cursor,
    record_from_row,
    record_to_row,
    record_values,
    to_iso,
)

log = structlog.get_logger("python_executor.store")
T = TypeVar("T")

SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS executions (
    execution_id     TEXT PRIMARY KEY NOT NULL,
    status           TEXT NOT NULL,
    created_at       TEXT NOT NULL,
    request          TEXT NOT NULL,
    stdout           TEXT NOT NULL,
    stderr           TEXT NOT NULL,
    exit_code        INTEGER,
    error            TEXT,
    error_type       TEXT,
    error_line       INTEGER,
    result           TEXT,
    started_at       TEXT,
    finished_at      TEXT,
    duration_ms      INTEGER,
    stdout_truncated INTEGER NOT NULL,
    stderr_truncated INTEGER NOT NULL,
    cpu_ms           INTEGER,
    peak_memory_mb   REAL
);
CREATE INDEX IF NOT EXISTS executions_by_created ON executions (created_at, execution_id);
CREATE INDEX IF NOT EXISTS executions_by_status
    ON executions (status, created_at, execution_id);
CREATE INDEX IF NOT EXISTS executions_by_finished
    ON executions (finished_at) WHERE finished_at IS NOT NULL;
"""

_PRAGMAS = ("journal_mode = WAL", "synchronous = NORMAL", "busy_timeout = 5000")
# The loop's connection never checkpoints: the side connection does, in a thread, once
# this many writes went to the WAL since the last time (SQLite's own default: 1000 pages).
CHECKPOINT_EVERY = 200
DELETE_BATCH = 500  # rows per retention statement: the loop is never held for long


def _marks(count: int) -> str:
    return ", ".join("?" * count)


_COLUMNS = ", ".join(FIELDS)
_INSERT = f"INSERT INTO executions ({_COLUMNS}) VALUES ({_marks(len(FIELDS))})"
_SELECT = f"SELECT {_COLUMNS} FROM executions"
# What a transition writes: all but what is fixed at creation (the id, created_at and the
# request, the biggest column: not encoded and written again on each change of status).
_CHANGING = tuple(name for name in FIELDS if name not in FIXED_FIELDS)
_ASSIGN = ", ".join(f"{name} = ?" for name in _CHANGING)
_ORDER = "ORDER BY created_at DESC, execution_id DESC LIMIT ?"
_FINISHED = tuple(s.value for s in FINISHED)
_UNFINISHED = tuple(s.value for s in UNFINISHED)
_DELETE_FINISHED = (
    "DELETE FROM executions WHERE execution_id IN (SELECT execution_id FROM executions"
    # "+status": filter on the status, but seek with the finished_at index
    f" WHERE finished_at < ? AND +status IN ({_marks(len(_FINISHED))}) LIMIT ?)"
    " RETURNING execution_id"
)


@functools.cache
def _transition_sql(count: int) -> str:
    return f"UPDATE executions SET {_ASSIGN} WHERE execution_id = ? AND status IN ({_marks(count)})"


def _records(rows: Iterable[Iterable[Any]]) -> builtins.list[ExecutionRecord]:
    return [record_from_row(dict(zip(FIELDS, row, strict=True))) for row in rows]


class SqliteStore:
    name = "sqlite"
    in_process = True  # statements run on the loop's thread (module doc)

    def __init__(self, path: Path) -> None:
        self.path = path
        self._db: sqlite3.Connection | None = None  # the loop's: every write
        self._side: sqlite3.Connection | None = None  # a thread's: listings, checkpoints
        self._side_lock = asyncio.Lock()
        self._writes = 0  # since the last checkpoint
        self._checkpoint: asyncio.Task[None] | None = None

    async def open(self) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            db = sqlite3.connect(self.path, isolation_level=None)
        except (OSError, sqlite3.Error) as exc:
            raise StoreUnavailable(f"cannot open the SQLite store at {self.path}: {exc}") from exc
        try:
            _prepare(db)
            side = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            side.execute("PRAGMA busy_timeout = 5000")
        except sqlite3.Error as exc:
            db.close()
            raise StoreUnavailable(f"cannot use the SQLite store at {self.path}: {exc}") from exc
        self._db, self._side = db, side

    async def close(self) -> None:
        if self._checkpoint is not None:
            await asyncio.shield(self._checkpoint)  # it is the side connection's user
        if self._db is not None:
            db, self._db = self._db, None
            db.close()
        if self._side is not None:
            side, self._side = self._side, None
            async with self._side_lock:
                side.close()  # the last connection to close checkpoints the WAL away

    @property
    def db(self) -> sqlite3.Connection:
        if self._db is None:
            raise RuntimeError("SqliteStore is not open")
        return self._db

    async def create(self, record: ExecutionRecord) -> None:
        row = record_to_row(record)
        try:
            self.db.execute(_INSERT, tuple(row.values()))
        except sqlite3.IntegrityError:
            raise DuplicateExecution(f"execution {record.execution_id} already exists") from None
        self._wrote()

    async def get(self, execution_id: str) -> ExecutionRecord | None:
        rows = self.db.execute(f"{_SELECT} WHERE execution_id = ?", (execution_id,)).fetchall()
        records = _records(rows)
        return records[0] if records else None

    async def transition(
        self, execution_id: str, expected: Collection[ExecutionStatus], record: ExecutionRecord
    ) -> bool:
        check_same_id(execution_id, record)
        values = record_values(record, _CHANGING)
        wanted = tuple(ExecutionStatus(s).value for s in expected)
        cursor = self.db.execute(_transition_sql(len(wanted)), (*values, execution_id, *wanted))
        self._wrote()
        return cursor.rowcount == 1

    async def list(
        self, status: ExecutionStatus | None, limit: int, cursor: str | None
    ) -> tuple[builtins.list[ExecutionRecord], str | None]:
        if limit < 1:
            raise ValueError(f"limit must be positive, got {limit}")
        where, params = _list_filter(status, cursor)
        sql, values = f"{_SELECT} {where} {_ORDER}", (*params, limit + 1)
        # A page may carry megabytes of output: read (and decode) it in a thread.
        records = await self._on_side(lambda side: _records(side.execute(sql, values)))
        if len(records) <= limit:
            return records, None
        last = records[limit - 1]
        return records[:limit], encode_cursor(last.created_at, last.execution_id)

    async def fail_unfinished(self, error: str) -> builtins.list[str]:
        rows = self.db.execute(
            "UPDATE executions SET status = ?, error = ?, finished_at = ?"
            f" WHERE status IN ({_marks(len(_UNFINISHED))}) RETURNING execution_id",
            (ExecutionStatus.FAILED.value, error, to_iso(utcnow()), *_UNFINISHED),
        ).fetchall()
        self._wrote()
        return [row[0] for row in rows]

    async def delete_finished_before(self, cutoff: datetime) -> builtins.list[str]:
        removed: builtins.list[str] = []
        while True:
            params = (to_iso(cutoff), *_FINISHED, DELETE_BATCH)
            batch = [row[0] for row in self.db.execute(_DELETE_FINISHED, params).fetchall()]
            self._wrote()
            removed += batch
            if len(batch) < DELETE_BATCH:
                return removed
            await asyncio.sleep(0)  # let requests in between batches

    async def count(self, status: ExecutionStatus) -> int:
        rows = self.db.execute(
            "SELECT count(*) FROM executions WHERE status = ?", (status.value,)
        ).fetchall()
        return int(rows[0][0])

    def set_trace_callback(self, callback: Callable[[str], object] | None) -> None:
        """Hand the SQL of every statement, on either connection, to ``callback``."""
        for connection in (self.db, self._side):
            if connection is not None:
                connection.set_trace_callback(callback)

    # --- the side connection ---------------------------------------------------------

    async def _on_side(self, work: Callable[[sqlite3.Connection], T]) -> T:
        async with self._side_lock:
            side = self._side
            if side is None:
                raise RuntimeError("SqliteStore is not open")
            return await anyio.to_thread.run_sync(work, side)

    def _wrote(self) -> None:
        self._writes += 1
        if self._writes >= CHECKPOINT_EVERY and self._checkpoint is None:
            self._writes = 0
            self._checkpoint = asyncio.create_task(self._run_checkpoint(), name="checkpoint")

    async def _run_checkpoint(self) -> None:
        try:
            await self._on_side(lambda side: side.execute("PRAGMA wal_checkpoint(PASSIVE)"))
        except (sqlite3.Error, RuntimeError) as exc:  # the WAL grows until the next one
            log.warning("sqlite checkpoint failed", error=str(exc))
        finally:
            self._checkpoint = None


def _prepare(db: sqlite3.Connection) -> None:
    for pragma in (*_PRAGMAS, "wal_autocheckpoint = 0"):
        db.execute(f"PRAGMA {pragma}")
    db.executescript(f"BEGIN; {_SCHEMA} PRAGMA user_version = {SCHEMA_VERSION}; COMMIT;")


def _list_filter(
    status: ExecutionStatus | None, cursor: str | None
) -> tuple[str, builtins.list[str]]:
    clauses: builtins.list[str] = []
    params: builtins.list[str] = []
    if status is not None:
        clauses.append("status = ?")
        params.append(status.value)
    if cursor is not None:
        created_at, execution_id = cursor_bounds(cursor)
        clauses.append("(created_at, execution_id) < (?, ?)")
        params += [to_iso(created_at), execution_id]
    return ("WHERE " + " AND ".join(clauses) if clauses else ""), params
