"""SQLite state store (the embedded default): one table in WAL mode, one connection.

Each statement runs in autocommit mode, so a write is one round trip to the
connection's thread and is committed when the call returns. With WAL and
``synchronous=NORMAL`` a commit survives the process dying at any point; only
an OS crash or power loss can take back the last few commits.

Usage::

    store = SqliteStore(Path("data/executions.db"))
    await store.open()
"""

from __future__ import annotations

import builtins
import sqlite3
from collections.abc import Collection, Iterable
from datetime import datetime
from pathlib import Path
from typing import Any

import aiosqlite
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
    check_same_id,
    cursor_bounds,
    encode_cursor,
    record_from_row,
    record_to_row,
    to_iso,
)

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

_COLUMNS = ", ".join(FIELDS)
_INSERT = f"INSERT INTO executions ({_COLUMNS}) VALUES ({', '.join('?' * len(FIELDS))})"
_SELECT = f"SELECT {_COLUMNS} FROM executions"
_ASSIGN = ", ".join(f"{name} = ?" for name in FIELDS[1:])
_ORDER = "ORDER BY created_at DESC, execution_id DESC LIMIT ?"
_FINISHED = tuple(s.value for s in FINISHED)
_UNFINISHED = tuple(s.value for s in UNFINISHED)


def _marks(count: int) -> str:
    return ", ".join("?" * count)


def _transition_sql(count: int) -> str:
    return f"UPDATE executions SET {_ASSIGN} WHERE execution_id = ? AND status IN ({_marks(count)})"


def _records(rows: Iterable[Iterable[Any]]) -> builtins.list[ExecutionRecord]:
    return [record_from_row(dict(zip(FIELDS, row, strict=True))) for row in rows]


class SqliteStore:
    name = "sqlite"

    def __init__(self, path: Path) -> None:
        self.path = path
        self._db: aiosqlite.Connection | None = None

    async def open(self) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            db = await aiosqlite.connect(self.path, isolation_level=None)
        except (OSError, sqlite3.Error) as exc:
            raise StoreUnavailable(f"cannot open the SQLite store at {self.path}: {exc}") from exc
        try:
            await self._prepare(db)
        except sqlite3.Error as exc:
            await db.close()
            raise StoreUnavailable(f"cannot use the SQLite store at {self.path}: {exc}") from exc
        self._db = db

    async def _prepare(self, db: aiosqlite.Connection) -> None:
        for pragma in _PRAGMAS:
            await db.execute(f"PRAGMA {pragma}")
        await db.executescript(f"BEGIN; {_SCHEMA} PRAGMA user_version = {SCHEMA_VERSION}; COMMIT;")

    async def close(self) -> None:
        if self._db is not None:
            db, self._db = self._db, None
            await db.close()

    @property
    def db(self) -> aiosqlite.Connection:
        if self._db is None:
            raise RuntimeError("SqliteStore is not open")
        return self._db

    async def create(self, record: ExecutionRecord) -> None:
        row = record_to_row(record)
        try:
            await self.db.execute(_INSERT, tuple(row.values()))
        except sqlite3.IntegrityError:
            raise DuplicateExecution(f"execution {record.execution_id} already exists") from None

    async def get(self, execution_id: str) -> ExecutionRecord | None:
        rows = await self.db.execute_fetchall(f"{_SELECT} WHERE execution_id = ?", (execution_id,))
        records = _records(rows)
        return records[0] if records else None

    async def transition(
        self, execution_id: str, expected: Collection[ExecutionStatus], record: ExecutionRecord
    ) -> bool:
        check_same_id(execution_id, record)
        values = tuple(record_to_row(record).values())[1:]
        wanted = tuple(ExecutionStatus(s).value for s in expected)
        sql = _transition_sql(len(wanted))
        cursor = await self.db.execute(sql, (*values, execution_id, *wanted))
        return cursor.rowcount == 1

    async def list(
        self, status: ExecutionStatus | None, limit: int, cursor: str | None
    ) -> tuple[builtins.list[ExecutionRecord], str | None]:
        if limit < 1:
            raise ValueError(f"limit must be positive, got {limit}")
        where, params = _list_filter(status, cursor)
        rows = await self.db.execute_fetchall(f"{_SELECT} {where} {_ORDER}", (*params, limit + 1))
        records = _records(rows)
        if len(records) <= limit:
            return records, None
        last = records[limit - 1]
        return records[:limit], encode_cursor(last.created_at, last.execution_id)

    async def fail_unfinished(self, error: str) -> builtins.list[str]:
        rows = await self.db.execute_fetchall(
            "UPDATE executions SET status = ?, error = ?, finished_at = ?"
            f" WHERE status IN ({_marks(len(_UNFINISHED))}) RETURNING execution_id",
            (ExecutionStatus.FAILED.value, error, to_iso(utcnow()), *_UNFINISHED),
        )
        return [row[0] for row in rows]

    async def delete_finished_before(self, cutoff: datetime) -> builtins.list[str]:
        rows = await self.db.execute_fetchall(
            # "+status": filter on the status, but seek with the finished_at index
            "DELETE FROM executions WHERE finished_at < ?"
            f" AND +status IN ({_marks(len(_FINISHED))}) RETURNING execution_id",
            (to_iso(cutoff), *_FINISHED),
        )
        return [row[0] for row in rows]

    async def count(self, status: ExecutionStatus) -> int:
        rows = await self.db.execute_fetchall(
            "SELECT count(*) FROM executions WHERE status = ?", (status.value,)
        )
        return int(next(iter(rows))[0])


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
