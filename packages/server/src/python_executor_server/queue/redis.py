"""Redis queue: one bounded, reliable list shared by every node (API nodes and workers).

``put`` pushes an id onto ``{ns}:queue:pending`` (a Lua script refuses when
the list already holds ``max_queue`` ids: 503). Each consumer of a worker
node moves one id at a time, atomically, into its node's ``taken`` list
(``BLMOVE``), runs it, then removes it: an id is always in exactly one of the
lists until its run is over, so a node that dies leaves its ids behind where
others can find them.

Every node holds a lease (``{ns}:node:{id}``, a per-process token with a TTL
of ``redis_lease_seconds``, refreshed three times per TTL) and is listed in
``{ns}:nodes``. Every node, API-only ones included, looks for listed nodes
whose lease has expired and recovers their taken ids, one ``LMOVE`` at a time
into its own taken list (so two recovering nodes never get the same id, and
a recoverer that dies leaves them findable again). For each recovered id the
service decides (``lost``): a record still ``pending`` never started and is
queued again at the head; a ``running`` one is marked ``failed`` ("worker
lost"), never run twice — user code may have had effects, or may be what
brought the node down. A node restarted with the same ``node_id`` waits for
its old lease to expire, then does the same with what its previous life left.

Usage::

    queue = RedisQueue(url, RedisKeys("pyexec"), node_id="worker-a", max_concurrent=4,
                       max_queue=100, consume=True)
    await queue.start(service.execute, service.lost)
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
from typing import TYPE_CHECKING

import structlog

from ..errors import QueueFull
from .base import Handler, LostHandler, QueueUnavailable
from .connection import cancel_safe, connect, redacted, redis_errors, text
from .keys import RedisKeys

if TYPE_CHECKING:
    from redis.asyncio import Redis

log = structlog.get_logger("python_executor.queue")

# KEYS: pending. ARGV: id, max. -1 when full, else the new length.
_PUT = """
if redis.call('LLEN', KEYS[1]) >= tonumber(ARGV[2]) then return -1 end
return redis.call('LPUSH', KEYS[1], ARGV[1])
"""

# KEYS: lease. ARGV: token, ttl ms. Take the lease when free, refresh it when ours.
_LEASE = """
local holder = redis.call('GET', KEYS[1])
if holder and holder ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return 1
"""

# KEYS: lease. ARGV: token.
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('DEL', KEYS[1]) end
return 1
"""

# KEYS: from list, to list. ARGV: id. Onto the consuming end of ``to`` (taken next), and
# only if it was still in ``from`` (a recoverer racing a restarted node must not duplicate it).
_MOVE = """
if redis.call('LREM', KEYS[1], 1, ARGV[1]) == 0 then return 0 end
return redis.call('RPUSH', KEYS[2], ARGV[1])
"""

# KEYS: nodes, lease, taken. ARGV: node id. Forget a node that is gone and holds nothing.
_FORGET = """
if redis.call('EXISTS', KEYS[2]) == 1 or redis.call('LLEN', KEYS[3]) > 0 then return 0 end
return redis.call('SREM', KEYS[1], ARGV[1])
"""


class RedisQueue:
    name = "redis"
    exclusive = False

    def __init__(
        self,
        url: str,
        keys: RedisKeys,
        *,
        node_id: str,
        max_concurrent: int,
        max_queue: int,
        consume: bool,
        retry_after: int = 1,
        lease_seconds: float = 10,
    ) -> None:
        self.url = url
        self.keys = keys
        self.node_id = node_id
        self._max_concurrent = max_concurrent
        self._max_queue = max_queue
        self._consume = consume
        self._retry_after = retry_after
        self._lease_ms = int(lease_seconds * 1000)
        self._token = secrets.token_hex(16)
        self._redis: Redis = connect(url)
        self._put = self._redis.register_script(_PUT)
        self._lease = self._redis.register_script(_LEASE)
        self._release = self._redis.register_script(_RELEASE)
        self._move = self._redis.register_script(_MOVE)
        self._forget = self._redis.register_script(_FORGET)
        self._lost: LostHandler | None = None
        self._consumers: list[asyncio.Task[None]] = []
        self._chores: list[asyncio.Task[None]] = []
        self._leased = False  # only a holder of the lease may touch this node's lists

    @property
    def _taken(self) -> str:
        return self.keys.taken(self.node_id)

    # --- start / stop ---------------------------------------------------------
    async def start(self, handler: Handler, lost: LostHandler) -> None:
        self._lost = lost
        await self._acquire_lease()
        self._leased = True
        await self._recover_own()
        self._chores = [
            asyncio.create_task(self._heartbeat(), name="queue-heartbeat"),
            asyncio.create_task(self._reaper(), name="queue-reaper"),
        ]
        if self._consume:
            self._consumers = [
                asyncio.create_task(self._work(handler), name=f"consumer-{n}")
                for n in range(self._max_concurrent)
            ]
        log.info("queue started", node=self.node_id, consumers=len(self._consumers))

    async def close(self) -> None:
        await _cancel_all(self._consumers)
        await _cancel_all(self._chores)
        if self._leased:
            with contextlib.suppress(*redis_errors()):
                await self._leave()
        await self._redis.aclose()

    async def _leave(self) -> None:
        # A BLMOVE cancelled in flight may have moved an id nobody will run: settle it now.
        await self._recover_own()
        await self._release(keys=[self.keys.lease(self.node_id)], args=[self._token])
        keys = [self.keys.nodes, self.keys.lease(self.node_id), self._taken]
        await self._forget(keys=keys, args=[self.node_id])
        self._leased = False

    async def _acquire_lease(self) -> None:
        """Take this node id's lease; a previous life's lease must expire first."""
        deadline = time.monotonic() + 2 * self._lease_ms / 1000 + 1
        try:
            while not await self._refresh_lease():
                if time.monotonic() > deadline:
                    raise QueueUnavailable(
                        f"node id {self.node_id!r} is in use by another live process; "
                        "give each node its own PYEXEC_NODE_ID"
                    )
                log.warning("waiting for the previous lease of this node id", node=self.node_id)
                await asyncio.sleep(0.5)
        except redis_errors() as exc:
            raise QueueUnavailable(f"cannot reach Redis at {redacted(self.url)}: {exc}") from exc

    async def _refresh_lease(self) -> bool:
        lease = self.keys.lease(self.node_id)
        if not await self._lease(keys=[lease], args=[self._token, self._lease_ms]):
            return False
        await self._redis.sadd(self.keys.nodes, self.node_id)
        return True

    # --- put / depth ----------------------------------------------------------
    async def put(self, execution_id: str) -> None:
        length = await self._put(keys=[self.keys.pending], args=[execution_id, self._max_queue])
        if int(length) < 0:
            raise QueueFull(
                f"the queue is full ({self._max_queue} executions waiting); retry later",
                retry_after=self._retry_after,
            )

    async def depth(self) -> int:
        return int(await self._redis.llen(self.keys.pending))

    async def full(self) -> bool:
        return await self.depth() >= self._max_queue

    def claim(self) -> None:
        return None  # every id goes through the shared list: any node may take it

    # --- consuming ------------------------------------------------------------
    async def _work(self, handler: Handler) -> None:
        while not cancel_requested():
            execution_id = await self._take()
            if execution_id is None:
                continue
            log.info("execution taken", execution_id=execution_id, node=self.node_id)
            try:
                await handler(execution_id)
            except Exception:  # the service finishes records itself; this is a bug
                log.exception("queue handler failed", execution_id=execution_id)
            # Cancelled (shutting down): not acknowledged, so ``close`` settles it with
            # ``lost`` like any other (a run cancelled before it started is queued again).
            await self._ack(execution_id)

    async def _take(self) -> str | None:
        try:
            taking = self._redis.blmove(self.keys.pending, self._taken, 1, "RIGHT", "LEFT")
            found = await cancel_safe(taking)  # an id moved as we stop is settled by close
        except redis_errors() as exc:
            log.warning("redis queue unreachable", error=str(exc))
            await pause(1)
            return None
        return None if found is None else text(found)

    async def _ack(self, execution_id: str) -> None:
        try:
            await self._redis.lrem(self._taken, 1, execution_id)
        except redis_errors() as exc:  # left in our list: settled at close or by a recoverer
            log.warning("could not acknowledge", execution_id=execution_id, error=str(exc))

    # --- leases and recovery --------------------------------------------------
    async def _heartbeat(self) -> None:
        while True:
            await pause(self._lease_ms / 3000)
            try:
                if not await self._refresh_lease():
                    log.error("another process holds this node's lease", node=self.node_id)
            except redis_errors() as exc:
                log.warning("could not refresh the lease", node=self.node_id, error=str(exc))

    async def _reaper(self) -> None:
        while True:
            try:
                await self._reap()
            except redis_errors() as exc:
                log.warning("could not look for lost nodes", error=str(exc))
            await pause(self._lease_ms / 2000)

    async def _reap(self) -> None:
        for node in sorted(text(n) for n in await self._redis.smembers(self.keys.nodes)):
            if node == self.node_id or await self._redis.exists(self.keys.lease(node)):
                continue
            await self._recover_from(node)
            keys = [self.keys.nodes, self.keys.lease(node), self.keys.taken(node)]
            if await self._forget(keys=keys, args=[node]):
                log.info("forgot a node that is gone", node=node)

    async def _recover_from(self, node: str) -> None:
        source = self.keys.taken(node)
        while (found := await self._redis.lmove(source, self._taken, "RIGHT", "LEFT")) is not None:
            execution_id = text(found)
            log.warning("recovering a lost node's execution", execution_id=execution_id, node=node)
            if not await self._settle(execution_id, give_back_to=source):
                return

    async def _recover_own(self) -> None:
        """Settle every id in our own taken list (no consumer runs while this does)."""
        for found in await self._redis.lrange(self._taken, 0, -1):
            await self._settle(text(found), give_back_to=self._taken)

    async def _settle(self, execution_id: str, give_back_to: str) -> bool:
        """Queue it again or drop it, as the service decides; False if that failed."""
        assert self._lost is not None
        try:
            again = await self._lost(execution_id)
        except Exception:  # the store is unreachable: try again on the next round
            log.exception("could not settle a lost execution", execution_id=execution_id)
            if give_back_to != self._taken:
                await self._move(keys=[self._taken, give_back_to], args=[execution_id])
            return False
        if again:
            await self._move(keys=[self._taken, self.keys.pending], args=[execution_id])
        else:
            await self._redis.lrem(self._taken, 1, execution_id)
        return True


async def _cancel_all(tasks: list[asyncio.Task[None]]) -> None:
    for task in tasks:
        task.cancel()
    for task in tasks:
        with contextlib.suppress(asyncio.CancelledError):
            await task
    tasks.clear()


def cancel_requested() -> bool:
    """True once the current task was cancelled, even if a library swallowed the error.

    redis-py can turn a cancellation that lands mid-command into a plain return;
    loops that run until cancelled check this so ``close`` never hangs.
    """
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


async def pause(seconds: float) -> None:
    """``asyncio.sleep`` in a loop that runs until cancelled (see ``cancel_requested``)."""
    if cancel_requested():
        raise asyncio.CancelledError
    await asyncio.sleep(seconds)
