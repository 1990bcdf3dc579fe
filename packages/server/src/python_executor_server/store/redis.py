"""Redis state store, for many API nodes and workers sharing one state.

A hash per record, a listing sorted set (all records, and one per status) and a
``finished`` sorted set for retention; key names are in ``queue/keys.py``.
Every change that touches a record and its indexes is one Lua script, so the
indexes never disagree with the records and ``transition`` is an atomic
compare-and-set. Needs the optional ``redis`` package.

Usage::

    store = RedisStore("redis://127.0.0.1:6379/0", namespace="pyexec")
    await store.open()
"""

from __future__ import annotations

import builtins
from collections.abc import Collection, Mapping, Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from python_executor_client.models import ExecutionStatus

from ..queue.keys import RedisKeys
from .base import (
    FINISHED,
    UNFINISHED,
    DuplicateExecution,
    ExecutionRecord,
    StoreUnavailable,
    utcnow,
)
from .codec import (
    check_same_id,
    cursor_from_key,
    decode_cursor,
    record_from_row,
    record_to_row,
    sort_key,
    to_iso,
    to_micros,
)

if TYPE_CHECKING:
    from redis.asyncio import Redis
    from redis.commands.core import AsyncScript

_STATUSES = tuple(s.value for s in ExecutionStatus)

# Shared prologue. KEYS: record, all, finished, one per status (in _STATUSES order);
# ARGV starts with the status names in that same order; script arguments follow.
_PROLOGUE = """
local n = #KEYS - 3
local function status_key(name)
  for i = 1, n do
    if ARGV[i] == name then return KEYS[3 + i] end
  end
  error('unknown status ' .. tostring(name))
end
local function arg(i) return ARGV[n + i] end
local function unindex(id)
  local member = redis.call('HGET', KEYS[1], '_member')
  local status = redis.call('HGET', KEYS[1], 'status')
  redis.call('ZREM', KEYS[2], member)
  redis.call('ZREM', status_key(status), member)
  redis.call('ZREM', KEYS[3], id)
end
"""

# ARGV: id, member, status, finished score ('' if none), k, k expected statuses,
# then field/value pairs. k = -1 means create (the record must not exist).
_WRITE = (
    _PROLOGUE
    + """
local id, member, status, finished, k = arg(1), arg(2), arg(3), arg(4), tonumber(arg(5))
local current = redis.call('HGET', KEYS[1], 'status')
if k < 0 then
  if current then return 0 end
else
  if not current then return 0 end
  local allowed = false
  for i = 1, k do
    if arg(5 + i) == current then allowed = true end
  end
  if not allowed then return 0 end
  unindex(id)
  redis.call('DEL', KEYS[1])
end
redis.call('HSET', KEYS[1], '_member', member, unpack(ARGV, n + 6 + math.max(k, 0)))
redis.call('ZADD', KEYS[2], 0, member)
redis.call('ZADD', status_key(status), 0, member)
if finished ~= '' then redis.call('ZADD', KEYS[3], finished, id) end
return 1
"""
)

# ARGV: id, error, finished_at ISO, finished_at µs, the failed status, unfinished statuses...
_FAIL = (
    _PROLOGUE
    + """
local id = arg(1)
local current = redis.call('HGET', KEYS[1], 'status')
local unfinished = false
for i = 6, #ARGV - n do
  if arg(i) == current then unfinished = true end
end
if not unfinished then return 0 end
local member = redis.call('HGET', KEYS[1], '_member')
redis.call('ZREM', status_key(current), member)
redis.call('ZADD', status_key(arg(5)), 0, member)
redis.call('HSET', KEYS[1], 'status', arg(5), 'error', arg(2), 'finished_at', arg(3))
redis.call('ZADD', KEYS[3], arg(4), id)
return 1
"""
)

# ARGV: id, cutoff µs. Only records in the finished set qualify.
_DELETE = (
    _PROLOGUE
    + """
local id = arg(1)
local score = redis.call('ZSCORE', KEYS[3], id)
if not score or tonumber(score) >= tonumber(arg(2)) then return 0 end
unindex(id)
redis.call('DEL', KEYS[1])
return 1
"""
)


def _connect(url: str) -> Redis:
    try:
        import redis.asyncio
    except ImportError as exc:
        raise StoreUnavailable(
            "the redis store needs the 'redis' package: pip install 'python-executor-server[redis]'"
        ) from exc
    try:
        return redis.asyncio.Redis.from_url(url, decode_responses=True)
    except ValueError as exc:
        raise StoreUnavailable(f"invalid redis_url {_redacted(url)!r}: {exc}") from exc


def _redacted(url: str) -> str:
    parts = urlsplit(url)
    host = parts.hostname or ""
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.scheme}://{host}{port}{parts.path}"


def _text(value: object) -> str:
    """Replies are text (``decode_responses=True``); the client's types say bytes | str."""
    if not isinstance(value, str):
        raise TypeError(f"expected text from Redis, got {type(value).__name__}")
    return value


def _texts(row: Mapping[Any, Any]) -> dict[str, str]:
    return {_text(k): _text(v) for k, v in row.items()}


def _id_of(member: str) -> str:
    return member.partition(":")[2]


class RedisStore:
    name = "redis"
    in_process = False

    def __init__(self, url: str, namespace: str = "pyexec") -> None:
        self.url = url
        self.keys = RedisKeys(namespace)
        self._redis = _connect(url)
        self._write = self._redis.register_script(_WRITE)
        self._fail = self._redis.register_script(_FAIL)
        self._delete = self._redis.register_script(_DELETE)

    async def open(self) -> None:
        import redis.exceptions

        try:
            await self._redis.ping()
        except (redis.exceptions.RedisError, OSError) as exc:
            raise StoreUnavailable(f"cannot reach Redis at {_redacted(self.url)}: {exc}") from exc

    async def close(self) -> None:
        await self._redis.aclose()

    def _keys_for(self, execution_id: str) -> builtins.list[str]:
        k = self.keys
        statuses = [k.status(s) for s in _STATUSES]
        return [k.record(execution_id), k.all_records, k.finished, *statuses]

    async def _run(self, script: AsyncScript, execution_id: str, args: Sequence[Any]) -> bool:
        keys = self._keys_for(execution_id)
        return bool(await script(keys=keys, args=[*_STATUSES, *args]))

    async def create(self, record: ExecutionRecord) -> None:
        if not await self._run(self._write, record.execution_id, _write_args(record, None)):
            raise DuplicateExecution(f"execution {record.execution_id} already exists")

    async def get(self, execution_id: str) -> ExecutionRecord | None:
        row = await self._redis.hgetall(self.keys.record(execution_id))
        return record_from_row(_texts(row)) if row else None

    async def transition(
        self, execution_id: str, expected: Collection[ExecutionStatus], record: ExecutionRecord
    ) -> bool:
        check_same_id(execution_id, record)
        return await self._run(self._write, execution_id, _write_args(record, expected))

    async def list(
        self, status: ExecutionStatus | None, limit: int, cursor: str | None
    ) -> tuple[builtins.list[ExecutionRecord], str | None]:
        if limit < 1:
            raise ValueError(f"limit must be positive, got {limit}")
        index = self.keys.all_records if status is None else self.keys.status(status.value)
        upper = "(" + decode_cursor(cursor) if cursor is not None else "+"
        found = await self._redis.zrevrangebylex(index, upper, "-", start=0, num=limit + 1)
        members = [_text(m) for m in found]
        page = await self._fetch([_id_of(m) for m in members[:limit]])
        next_cursor = cursor_from_key(members[limit - 1]) if len(members) > limit else None
        return page, next_cursor

    async def _fetch(self, ids: Sequence[str]) -> builtins.list[ExecutionRecord]:
        async with self._redis.pipeline(transaction=False) as pipe:
            for execution_id in ids:
                pipe.hgetall(self.keys.record(execution_id))
            rows = await pipe.execute()
        return [record_from_row(_texts(row)) for row in rows if row]  # deleted meanwhile

    async def fail_unfinished(self, error: str) -> builtins.list[str]:
        now = utcnow()
        unfinished = [s.value for s in UNFINISHED]
        ids: builtins.list[str] = []
        for status in unfinished:
            members = await self._redis.zrange(self.keys.status(status), 0, -1)
            ids += [_id_of(_text(m)) for m in members]
        args = [error, to_iso(now), to_micros(now), ExecutionStatus.FAILED.value, *unfinished]
        return await self._each(self._fail, ids, args)

    async def delete_finished_before(self, cutoff: datetime) -> builtins.list[str]:
        cutoff_us = to_micros(cutoff)
        found = await self._redis.zrangebyscore(self.keys.finished, "-inf", f"({cutoff_us}")
        ids = [_text(m) for m in found]
        return await self._each(self._delete, ids, [cutoff_us])

    async def _each(
        self, script: AsyncScript, ids: Sequence[str], args: Sequence[Any]
    ) -> builtins.list[str]:
        """Run ``script`` for each id in one pipeline; the ids it acted on."""
        async with self._redis.pipeline(transaction=False) as pipe:
            for execution_id in ids:
                keys = self._keys_for(execution_id)
                await script(keys=keys, args=[*_STATUSES, execution_id, *args], client=pipe)
            done = await pipe.execute()
        return [i for i, ok in zip(ids, done, strict=True) if ok]

    async def count(self, status: ExecutionStatus) -> int:
        return int(await self._redis.zcard(self.keys.status(status.value)))


def _write_args(record: ExecutionRecord, expected: Collection[ExecutionStatus] | None) -> list[Any]:
    finished_at = record.finished_at if record.status in FINISHED else None
    finished_score = "" if finished_at is None else to_micros(finished_at)
    wanted = [ExecutionStatus(s).value for s in expected] if expected is not None else []
    fields = [
        x
        for name, value in record_to_row(record).items()
        if value is not None
        for x in (name, value)
    ]
    return [
        record.execution_id,
        sort_key(record.created_at, record.execution_id),
        record.status.value,
        finished_score,
        -1 if expected is None else len(wanted),
        *wanted,
        *fields,
    ]
