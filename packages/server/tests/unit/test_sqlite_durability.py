"""SqliteStore on disk: records outlive the store, the process, and use the indexes."""

from __future__ import annotations

import asyncio
import signal
import sqlite3
import sys
import textwrap
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from python_executor_client.models import ExecutionStatus
from python_executor_server.store.base import ExecutionRecord
from python_executor_server.store.sqlite import (
    CHECKPOINT_EVERY,
    DELETE_BATCH,
    SCHEMA_VERSION,
    SqliteStore,
)

T0 = datetime(2026, 11, 26, 14, 0, tzinfo=UTC)


@pytest.fixture()
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "data" / "executions.db"


@pytest.fixture()
async def store(db_path: Path) -> AsyncIterator[SqliteStore]:
    opened = SqliteStore(db_path)
    await opened.open()
    yield opened
    await opened.close()


def full_record() -> ExecutionRecord:
    return ExecutionRecord.new(request={"code": "print('ü')", "args": ["-v"]}).evolve(
        status=ExecutionStatus.COMPLETED,
        stdout="out ✓\n" * 1000,
        stderr="err",
        exit_code=3,
        error_type="ValueError",
        error_line=7,
        result="None",
        started_at=T0,
        finished_at=T0 + timedelta(seconds=2),
        duration_ms=2000,
        stdout_truncated=True,
        cpu_ms=1500,
        peak_memory_mb=33.5,
    )


async def test_a_new_store_on_the_same_file_reads_what_the_old_one_wrote(db_path: Path) -> None:
    first = SqliteStore(db_path)
    await first.open()
    done, waiting = full_record(), ExecutionRecord.new(request={})
    await first.create(done)
    await first.create(waiting)
    await first.close()

    second = SqliteStore(db_path)
    await second.open()
    try:
        assert await second.get(done.execution_id) == done
        assert await second.get(waiting.execution_id) == waiting
        assert await second.count(ExecutionStatus.PENDING) == 1
        page, _ = await second.list(None, 10, None)
        assert {r.execution_id for r in page} == {done.execution_id, waiting.execution_id}
    finally:
        await second.close()


_CRASHING_WRITER = """
import asyncio, os, signal, sys
from pathlib import Path
from python_executor_client.models import ExecutionStatus
from python_executor_server.store.base import ExecutionRecord
from python_executor_server.store.sqlite import SqliteStore

async def main() -> None:
    store = SqliteStore(Path(sys.argv[1]))
    await store.open()
    done = ExecutionRecord.new(request={}, execution_id="exe_done")
    await store.create(done)
    running = done.evolve(status=ExecutionStatus.RUNNING, stdout="so far")
    await store.transition("exe_done", {ExecutionStatus.PENDING}, running)
    await store.transition(
        "exe_done", {ExecutionStatus.RUNNING}, running.evolve(status=ExecutionStatus.COMPLETED)
    )
    await store.create(ExecutionRecord.new(request={}, execution_id="exe_inflight"))
    print("written", flush=True)
    os.kill(os.getpid(), signal.SIGKILL)  # no close, no checkpoint: the process just dies

asyncio.run(main())
"""


async def test_committed_writes_survive_the_process_being_killed(db_path: Path) -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        textwrap.dedent(_CRASHING_WRITER),
        str(db_path),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    stdout, stderr = await asyncio.wait_for(proc.communicate(), timeout=60)
    assert proc.returncode == -signal.SIGKILL, stderr.decode()
    assert stdout == b"written\n"
    assert db_path.with_name("executions.db-wal").exists()  # the data is still in the WAL

    store = SqliteStore(db_path)
    await store.open()
    try:
        done = await store.get("exe_done")
        assert done is not None
        assert (done.status, done.stdout) == (ExecutionStatus.COMPLETED, "so far")
        assert await store.fail_unfinished("server restarted") == ["exe_inflight"]
        inflight = await store.get("exe_inflight")
        assert inflight is not None and inflight.status == ExecutionStatus.FAILED
        assert inflight.error == "server restarted"
    finally:
        await store.close()


async def test_file_settings(store: SqliteStore, db_path: Path) -> None:
    assert store.db.execute("PRAGMA synchronous").fetchall() == [(1,)]  # NORMAL
    with sqlite3.connect(db_path) as other:
        assert other.execute("PRAGMA journal_mode").fetchone() == ("wal",)
        assert other.execute("PRAGMA user_version").fetchone() == (SCHEMA_VERSION,)
    other.close()


async def test_checkpoints_move_the_wal_into_the_database_file(
    store: SqliteStore, db_path: Path, tmp_path: Path
) -> None:
    # The loop's connection never checkpoints (its fsyncs would stall the event loop) ...
    assert store.db.execute("PRAGMA wal_autocheckpoint").fetchall() == [(0,)]
    records = [ExecutionRecord.new(request={"n": n}) for n in range(CHECKPOINT_EVERY)]
    for record in records:
        await store.create(record)
    # ... a thread does, on its own connection: the database file alone then has them all.
    deadline = asyncio.get_running_loop().time() + 10
    while (count := _rows_in_file_alone(db_path, tmp_path)) < len(records):
        assert asyncio.get_running_loop().time() < deadline, f"{count} rows checkpointed"
        await asyncio.sleep(0.05)
    assert count == len(records)


def _rows_in_file_alone(db_path: Path, tmp_path: Path) -> int:
    """The records a copy of the database file holds without its -wal file beside it."""
    alone = tmp_path / "alone.db"
    alone.write_bytes(db_path.read_bytes())
    copy = sqlite3.connect(alone)
    try:
        return int(copy.execute("SELECT count(*) FROM executions").fetchone()[0])
    except sqlite3.OperationalError:  # not even the schema was checkpointed yet
        return 0
    finally:
        copy.close()
        alone.unlink()


async def test_retention_deletes_every_expired_record_in_batches(store: SqliteStore) -> None:
    expired = set()
    for _ in range(2 * DELETE_BATCH + 7):
        record = full_record()
        await store.create(record)
        expired.add(record.execution_id)
    kept = full_record().evolve(finished_at=T0 + timedelta(days=2))
    await store.create(kept)
    removed = await store.delete_finished_before(T0 + timedelta(days=1))
    assert sorted(removed) == sorted(expired)
    assert await store.count(ExecutionStatus.COMPLETED) == 1
    assert await store.get(kept.execution_id) == kept


async def test_reopening_keeps_the_schema_and_data(db_path: Path) -> None:
    rec = full_record()
    for _ in range(3):
        store = SqliteStore(db_path)
        await store.open()
        if await store.get(rec.execution_id) is None:
            await store.create(rec)
        assert await store.get(rec.execution_id) == rec
        await store.close()


async def _traced(store: SqliteStore) -> list[str]:
    """The SQL (with bound values) that the store's queries send, via a trace callback."""
    seen: list[str] = []
    for _ in range(3):
        await store.create(full_record())
    store.set_trace_callback(seen.append)
    page, cursor = await store.list(None, 1, None)
    assert cursor is not None
    await store.list(None, 1, cursor)
    await store.list(ExecutionStatus.COMPLETED, 1, None)
    await store.list(ExecutionStatus.COMPLETED, 1, cursor)
    await store.get(page[0].execution_id)
    await store.count(ExecutionStatus.PENDING)
    await store.delete_finished_before(T0)
    store.set_trace_callback(None)
    return [s for s in seen if s.startswith(("SELECT", "DELETE"))]


# What each statement's plan must be: a seek or ordered walk of the named index,
# never a table scan, never a sort of the result.
EXPECTED_PLANS = [
    "SCAN executions USING INDEX executions_by_created",  # first page: walk from the end
    "SEARCH executions USING INDEX executions_by_created ((created_at,execution_id)<(?,?))",
    "SEARCH executions USING INDEX executions_by_status (status=?)",
    "SEARCH executions USING INDEX executions_by_status (status=? AND "
    "(created_at,execution_id)<(?,?))",
    "SEARCH executions USING INDEX sqlite_autoindex_executions_1 (execution_id=?)",
    "SEARCH executions USING COVERING INDEX executions_by_status (status=?)",
    # retention, in batches: the batch's ids by the finished_at index, then each by its key
    "SEARCH executions USING COVERING INDEX sqlite_autoindex_executions_1 (execution_id=?)"
    " | LIST SUBQUERY 1 | SEARCH executions USING INDEX executions_by_finished (finished_at<?)",
]


async def test_queries_seek_the_right_index_and_never_sort(store: SqliteStore) -> None:
    plans = []
    for sql in await _traced(store):
        rows = store.db.execute(f"EXPLAIN QUERY PLAN {sql}").fetchall()
        plans.append(" | ".join(str(row[3]) for row in rows))
    assert plans == EXPECTED_PLANS
