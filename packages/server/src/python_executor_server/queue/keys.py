"""Every Redis key name we use, in one place. All start with the configured namespace.

Store keys (``store/redis.py``)::

    {ns}:exec:{execution_id}        hash    one execution record (one field per attribute)
    {ns}:execs:all                  zset    every record, listing order (see below)
    {ns}:execs:status:{status}      zset    the records in that status, same members
    {ns}:execs:finished             zset    finished records, scored by finished_at (µs)

Listing sets hold members ``<created_at µs, 16 digits>:<execution_id>`` with
score 0, so that lexicographic order is (created_at, id) order.

Usage::

    keys = RedisKeys("pyexec")
    keys.record("exe_…")   # 'pyexec:exec:exe_…'
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class RedisKeys:
    namespace: str = "pyexec"

    def record(self, execution_id: str) -> str:
        return f"{self.namespace}:exec:{execution_id}"

    @property
    def all_records(self) -> str:
        return f"{self.namespace}:execs:all"

    def status(self, status: str) -> str:
        return f"{self.namespace}:execs:status:{status}"

    @property
    def finished(self) -> str:
        return f"{self.namespace}:execs:finished"
