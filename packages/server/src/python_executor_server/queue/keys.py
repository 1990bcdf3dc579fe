"""Every Redis key name we use, in one place. All start with the configured namespace.

Store keys (``store/redis.py``)::

    {ns}:exec:{execution_id}        hash    one execution record (one field per attribute)
    {ns}:execs:all                  zset    every record, listing order (see below)
    {ns}:execs:status:{status}      zset    the records in that status, same members
    {ns}:execs:finished             zset    finished records, scored by finished_at (µs)

Listing sets hold members ``<created_at µs, 16 digits>:<execution_id>`` with
score 0, so that lexicographic order is (created_at, id) order.

Queue keys (``queue/redis.py``)::

    {ns}:queue:pending              list    ids waiting; LPUSH in, BLMOVE out from the right
    {ns}:queue:taken:{node}         list    ids a node has taken and not yet finished
    {ns}:nodes                      set     node ids that may hold taken ids
    {ns}:node:{node}                string  the node's lease (a per-process token, PX ttl)

Bus keys and channels (``queue/bus.py``, ``queue/projects.py``)::

    {ns}:bus:kill                   channel execution ids to kill, wherever they run
    {ns}:bus:finished               channel execution ids that just finished
    {ns}:output:{execution_id}      stream  live output chunks, then an ``end`` entry (TTL)
    {ns}:project:{execution_id}     string  an exec project as an uncompressed tar (TTL)

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

    # --- queue ----------------------------------------------------------------
    @property
    def pending(self) -> str:
        return f"{self.namespace}:queue:pending"

    def taken(self, node_id: str) -> str:
        return f"{self.namespace}:queue:taken:{node_id}"

    @property
    def nodes(self) -> str:
        return f"{self.namespace}:nodes"

    def lease(self, node_id: str) -> str:
        return f"{self.namespace}:node:{node_id}"

    # --- bus ------------------------------------------------------------------
    @property
    def kill_channel(self) -> str:
        return f"{self.namespace}:bus:kill"

    @property
    def finished_channel(self) -> str:
        return f"{self.namespace}:bus:finished"

    def output(self, execution_id: str) -> str:
        return f"{self.namespace}:output:{execution_id}"

    def project(self, execution_id: str) -> str:
        return f"{self.namespace}:project:{execution_id}"
