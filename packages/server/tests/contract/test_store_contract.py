"""The StateStore contract: every store (memory, sqlite, redis) passes all of it."""

from __future__ import annotations

import asyncio
import random
from datetime import UTC, datetime, timedelta, timezone

import pytest
from python_executor_client.models import ExecutionStatus
from python_executor_server.errors import BadRequest
from python_executor_server.store import StateStore
from python_executor_server.store.base import (
    DuplicateExecution,
    ExecutionRecord,
    new_execution_id,
    utcnow,
)

PENDING = ExecutionStatus.PENDING
RUNNING = ExecutionStatus.RUNNING
COMPLETED = ExecutionStatus.COMPLETED
FAILED = ExecutionStatus.FAILED
KILLED = ExecutionStatus.KILLED

T0 = datetime(2026, 11, 26, 14, 0, 0, 123456, tzinfo=UTC)


def record(
    created_at: datetime = T0, status: ExecutionStatus = PENDING, execution_id: str | None = None
) -> ExecutionRecord:
    return ExecutionRecord(
        execution_id=execution_id or new_execution_id(),
        status=status,
        created_at=created_at,
        request={"code": "print(1)"},
    )


def finished(
    status: ExecutionStatus, finished_at: datetime, created_at: datetime = T0
) -> ExecutionRecord:
    return record(created_at, status).evolve(started_at=created_at, finished_at=finished_at)


async def list_all(
    store: StateStore, status: ExecutionStatus | None = None, limit: int = 7
) -> list[ExecutionRecord]:
    """Every record, following the cursor page by page."""
    records: list[ExecutionRecord] = []
    cursor: str | None = None
    while True:
        page, cursor = await store.list(status, limit, cursor)
        assert len(page) <= limit
        records += page
        if cursor is None:
            return records


def newest_first(records: list[ExecutionRecord]) -> list[str]:
    ordered = sorted(records, key=lambda r: (r.created_at, r.execution_id), reverse=True)
    return [r.execution_id for r in ordered]


# --- create / get -------------------------------------------------------------


async def test_every_field_roundtrips(store: StateStore) -> None:
    plus_five = timezone(timedelta(hours=5, minutes=30))
    full = ExecutionRecord(
        execution_id=new_execution_id(),
        status=COMPLETED,
        created_at=datetime(2026, 1, 2, 3, 4, 5, 678901, tzinfo=plus_five),
        request={"code": "print('é')", "files": [{"name": "a.py"}], "n": 3, "ok": True},
        stdout="héllo ✓ 😀\x00\t\r\n" * 100_000,  # > 1 MB of UTF-8, NUL and control characters
        stderr="Traceback …\nNameError: name 'x' is not defined\n",
        exit_code=1,
        error="timed out after 5 s",
        error_type="pkg.module.CustomError",
        error_line=42,
        result="'ünïcode'",
        started_at=T0,
        finished_at=T0 + timedelta(seconds=1, microseconds=1),
        duration_ms=1000,
        stdout_truncated=True,
        stderr_truncated=True,
        cpu_ms=987,
        peak_memory_mb=12.75,
    )
    assert len(full.stdout.encode()) > 1024 * 1024
    await store.create(full)

    got = await store.get(full.execution_id)

    assert got == full
    assert got is not None and got.created_at.utcoffset() is not None
    assert got.created_at == datetime(2026, 1, 1, 21, 34, 5, 678901, tzinfo=UTC)


async def test_defaults_and_none_values_roundtrip(store: StateStore) -> None:
    bare = ExecutionRecord.new(request={})
    await store.create(bare)

    got = await store.get(bare.execution_id)

    assert got == bare
    assert got is not None
    assert got.stdout == "" and got.exit_code is None and got.peak_memory_mb is None
    assert got.stdout_truncated is False and got.request == {}


async def test_get_unknown_id_is_none(store: StateStore) -> None:
    assert await store.get(new_execution_id()) is None


async def test_duplicate_create_is_rejected_and_keeps_the_original(store: StateStore) -> None:
    original = record()
    await store.create(original)

    with pytest.raises(DuplicateExecution):
        await store.create(original.evolve(status=RUNNING, stdout="impostor"))

    assert await store.get(original.execution_id) == original
    assert await store.count(PENDING) == 1
    assert await store.count(RUNNING) == 0


async def test_naive_datetimes_are_refused(store: StateStore) -> None:
    naive = record(created_at=datetime(2026, 1, 1))
    with pytest.raises(ValueError, match="naive"):
        await store.create(naive)
    assert await store.get(naive.execution_id) is None


# --- transition -----------------------------------------------------------------


async def test_transition_replaces_the_record(store: StateStore) -> None:
    rec = record()
    await store.create(rec)
    running = rec.evolve(status=RUNNING, started_at=T0 + timedelta(seconds=1))

    assert await store.transition(rec.execution_id, {PENDING}, running) is True

    assert await store.get(rec.execution_id) == running
    assert (await store.count(PENDING), await store.count(RUNNING)) == (0, 1)


async def test_transition_from_unexpected_status_changes_nothing(store: StateStore) -> None:
    rec = record(status=RUNNING)
    await store.create(rec)
    done = rec.evolve(status=COMPLETED, stdout="done", finished_at=T0)

    assert await store.transition(rec.execution_id, {PENDING}, done) is False
    assert await store.transition(rec.execution_id, [], done) is False

    assert await store.get(rec.execution_id) == rec
    assert (await store.count(RUNNING), await store.count(COMPLETED)) == (1, 0)
    assert [r.execution_id for r in await list_all(store, RUNNING)] == [rec.execution_id]


async def test_transition_accepts_any_of_several_expected(store: StateStore) -> None:
    rec = record(status=RUNNING)
    await store.create(rec)
    killed = rec.evolve(status=KILLED, finished_at=T0)

    assert await store.transition(rec.execution_id, (PENDING, RUNNING), killed) is True

    assert await store.get(rec.execution_id) == killed


async def test_transition_of_unknown_id_is_false_and_creates_nothing(store: StateStore) -> None:
    ghost = record()

    assert await store.transition(ghost.execution_id, {PENDING}, ghost) is False

    assert await store.get(ghost.execution_id) is None
    assert await store.count(PENDING) == 0


async def test_transition_with_another_records_id_is_an_error(store: StateStore) -> None:
    rec, other = record(), record()
    await store.create(rec)
    with pytest.raises(ValueError):
        await store.transition(rec.execution_id, {PENDING}, other)
    assert await store.get(rec.execution_id) == rec


async def test_transition_can_clear_fields(store: StateStore) -> None:
    rec = record(status=RUNNING).evolve(result="1", error="x", cpu_ms=5, peak_memory_mb=1.5)
    await store.create(rec)
    cleared = rec.evolve(status=COMPLETED, result=None, error=None, cpu_ms=None)

    assert await store.transition(rec.execution_id, {RUNNING}, cleared) is True

    assert await store.get(rec.execution_id) == cleared


async def test_concurrent_transitions_have_exactly_one_winner(
    store: StateStore, second_store: StateStore
) -> None:
    for _ in range(5):
        rec = record()
        await store.create(rec)
        contenders = [
            rec.evolve(status=random.choice([RUNNING, KILLED]), stdout=f"contender {i}")
            for i in range(12)
        ]
        stores = [store, second_store] * 6

        results = await asyncio.gather(
            *(
                s.transition(rec.execution_id, {PENDING}, c)
                for s, c in zip(stores, contenders, strict=True)
            )
        )

        assert sum(results) == 1
        winner = contenders[results.index(True)]
        assert await store.get(rec.execution_id) == winner
        assert await second_store.get(rec.execution_id) == winner


async def test_transition_moves_the_record_between_status_listings(store: StateStore) -> None:
    rec = record()
    await store.create(rec)
    await store.transition(rec.execution_id, {PENDING}, rec.evolve(status=RUNNING))

    assert await list_all(store, PENDING) == []
    assert [r.execution_id for r in await list_all(store, RUNNING)] == [rec.execution_id]
    assert [r.status for r in await list_all(store)] == [RUNNING]


# --- list -----------------------------------------------------------------------


async def test_list_is_newest_first(store: StateStore) -> None:
    records = [record(T0 + timedelta(seconds=i)) for i in range(10)]
    for rec in random.sample(records, len(records)):
        await store.create(rec)

    page, cursor = await store.list(None, 100, None)

    assert [r.execution_id for r in page] == newest_first(records)
    assert page == sorted(records, key=lambda r: r.created_at, reverse=True)
    assert cursor is None


async def test_list_breaks_created_at_ties_by_id(store: StateStore) -> None:
    records = [record(T0) for _ in range(6)] + [record(T0 + timedelta(microseconds=1))]
    for rec in records:
        await store.create(rec)

    assert [r.execution_id for r in await list_all(store, limit=2)] == newest_first(records)


async def test_pagination_visits_every_record_once(store: StateStore) -> None:
    records = [record(T0 + timedelta(milliseconds=i % 9)) for i in range(25)]
    for rec in records:
        await store.create(rec)

    first, cursor = await store.list(None, 10, None)
    second, cursor = await store.list(None, 10, cursor)
    third, cursor = await store.list(None, 10, cursor)

    assert (len(first), len(second), len(third), cursor) == (10, 10, 5, None)
    ids = [r.execution_id for r in first + second + third]
    assert ids == newest_first(records)


async def test_last_full_page_has_no_cursor(store: StateStore) -> None:
    for i in range(4):
        await store.create(record(T0 + timedelta(seconds=i)))

    _, cursor = await store.list(None, 2, None)
    assert cursor is not None
    second, cursor = await store.list(None, 2, cursor)

    assert len(second) == 2 and cursor is None
    assert await store.list(None, 5, None) == (await list_all(store, limit=5), None)


async def test_cursor_is_stable_while_records_come_and_go(store: StateStore) -> None:
    records = [record(T0 + timedelta(seconds=i)) for i in range(6)]
    for rec in records:
        await store.create(rec)
    expected = newest_first(records)

    first, cursor = await store.list(None, 3, None)
    await store.create(record(T0 + timedelta(hours=1)))  # newer: belongs before page 1
    removed = first[0].evolve(status=COMPLETED, finished_at=T0)
    await store.transition(removed.execution_id, {PENDING}, removed)
    await store.delete_finished_before(T0 + timedelta(days=1))  # a page-1 record goes
    second, cursor = await store.list(None, 3, cursor)

    assert [r.execution_id for r in first] == expected[:3]
    assert [r.execution_id for r in second] == expected[3:]
    assert cursor is None


async def test_list_filters_by_status(store: StateStore) -> None:
    statuses = [PENDING, RUNNING, COMPLETED, FAILED, KILLED] * 5
    records = [record(T0 + timedelta(seconds=i), s) for i, s in enumerate(statuses)]
    for rec in records:
        await store.create(rec)

    for status in ExecutionStatus:
        got = await list_all(store, status, limit=2)
        assert [r.execution_id for r in got] == newest_first(
            [r for r in records if r.status == status]
        )
        assert all(r.status == status for r in got)
    assert len(await list_all(store)) == 25


async def test_list_of_empty_store(store: StateStore) -> None:
    assert await store.list(None, 10, None) == ([], None)
    assert await store.list(FAILED, 10, None) == ([], None)


@pytest.mark.parametrize("cursor", ["nonsense!", "", "MTIzOmFi", "_" * 40])
async def test_foreign_cursor_is_a_bad_request(store: StateStore, cursor: str) -> None:
    with pytest.raises(BadRequest, match="cursor"):
        await store.list(None, 10, cursor)


async def test_limit_must_be_positive(store: StateStore) -> None:
    with pytest.raises(ValueError):
        await store.list(None, 0, None)


# --- fail_unfinished / delete_finished_before / count ----------------------------


async def test_fail_unfinished_fails_pending_and_running_only(store: StateStore) -> None:
    pending = record()
    running = record(status=RUNNING).evolve(started_at=T0, stdout="partial output")
    done = finished(COMPLETED, T0)
    killed = finished(KILLED, T0)
    for rec in (pending, running, done, killed):
        await store.create(rec)
    before = utcnow()

    failed_ids = await store.fail_unfinished("server restarted")

    after = utcnow()
    assert sorted(failed_ids) == sorted([pending.execution_id, running.execution_id])
    for rec in (pending, running):
        got = await store.get(rec.execution_id)
        assert got is not None and got.finished_at is not None
        assert before <= got.finished_at <= after
        assert got == rec.evolve(
            status=FAILED, error="server restarted", finished_at=got.finished_at
        )
    assert await store.get(done.execution_id) == done
    assert await store.get(killed.execution_id) == killed
    assert (await store.count(PENDING), await store.count(RUNNING), await store.count(FAILED)) == (
        0,
        0,
        2,
    )
    assert await store.fail_unfinished("again") == []


async def test_delete_finished_before_deletes_only_old_finished_records(
    store: StateStore,
) -> None:
    cutoff = T0 + timedelta(hours=1)
    old = [finished(s, cutoff - timedelta(seconds=1)) for s in (COMPLETED, FAILED, KILLED)]
    young = [finished(COMPLETED, cutoff), finished(FAILED, cutoff + timedelta(seconds=1))]
    # not finished: kept whatever finished_at says
    unfinished = [record(), record(status=RUNNING).evolve(finished_at=T0)]
    for rec in old + young + unfinished:
        await store.create(rec)

    deleted = await store.delete_finished_before(cutoff)

    assert sorted(deleted) == sorted(r.execution_id for r in old)
    for rec in old:
        assert await store.get(rec.execution_id) is None
    for rec in young + unfinished:
        assert await store.get(rec.execution_id) == rec
    assert newest_first(await list_all(store)) == newest_first(young + unfinished)
    assert await store.count(KILLED) == 0
    assert await store.delete_finished_before(cutoff) == []


async def test_deleted_records_leave_every_listing(store: StateStore) -> None:
    rec = finished(FAILED, T0)
    await store.create(rec)
    await store.delete_finished_before(T0 + timedelta(seconds=1))

    assert await store.list(None, 10, None) == ([], None)
    assert await store.list(FAILED, 10, None) == ([], None)
    assert await store.count(FAILED) == 0
    await store.create(rec)  # the id is free again
    assert await store.get(rec.execution_id) == rec


async def test_record_that_finishes_after_creation_is_retained_by_its_finished_at(
    store: StateStore,
) -> None:
    rec = record(status=RUNNING)
    await store.create(rec)
    done = rec.evolve(status=COMPLETED, finished_at=T0 + timedelta(hours=2))
    await store.transition(rec.execution_id, {RUNNING}, done)

    assert await store.delete_finished_before(T0 + timedelta(hours=1)) == []
    assert await store.delete_finished_before(T0 + timedelta(hours=3)) == [rec.execution_id]


async def test_count_by_status(store: StateStore) -> None:
    for status, n in ((PENDING, 3), (RUNNING, 2), (COMPLETED, 4), (KILLED, 1)):
        for _ in range(n):
            await store.create(record(status=status))

    counts = {s: await store.count(s) for s in ExecutionStatus}

    assert counts == {PENDING: 3, RUNNING: 2, COMPLETED: 4, FAILED: 0, KILLED: 1}


# --- redis only: key hygiene ---------------------------------------------------


@pytest.mark.redis
async def test_redis_keys_stay_in_the_namespace_and_go_with_the_records(redis_url: str) -> None:
    import redis.asyncio
    from python_executor_server.store.redis import RedisStore

    url = redis_url.rsplit("/", 1)[0] + "/9"  # a database of its own, other tests use 0
    mine, theirs = RedisStore(url, "ns-mine"), RedisStore(url, "ns-theirs")
    raw = redis.asyncio.Redis.from_url(url, decode_responses=True)
    try:
        await raw.flushdb()
        await mine.open()
        await theirs.open()
        rec = record()
        await mine.create(rec)
        await mine.transition(rec.execution_id, {PENDING}, rec.evolve(status=RUNNING))
        await mine.fail_unfinished("server restarted")

        keys = [k async for k in raw.scan_iter("*")]
        assert keys and all(k.startswith("ns-mine:") for k in keys)
        assert await theirs.get(rec.execution_id) is None
        assert await theirs.list(None, 10, None) == ([], None)

        assert await mine.delete_finished_before(utcnow() + timedelta(seconds=1)) == [
            rec.execution_id
        ]
        assert [k async for k in raw.scan_iter("*")] == []
    finally:
        await raw.aclose()
        await mine.close()
        await theirs.close()
