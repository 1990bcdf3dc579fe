"""Pre-started single-use sandboxes, kept per key and refilled in the background.

A pooled sandbox is a cold run stopped just before its job: its own workspace
(empty /work and /tmp), cgroup, rlimits, seccomp filter and namespaces, and the
pre-startable program (the eval driver) started and blocked reading its job
socket. Handing a run over costs writing the project, adjusting what can change
live (the cgroup's memory, pids and CPU weight) and sending the job. Each one
runs once and is destroyed like any other sandbox.

The key is everything fixed when a sandbox starts (``PoolKey``): interpreter,
launch command and environment, network, disk size, rlimits. Keys are learned from
the runs asked for (``take``) and from ``warm`` (the node warms a default eval's at
start), at most ``pool_max_keys``, least recently used
dropped first; each keeps ``pool_size`` sandboxes (``pool_zygote_size`` where they are
forks of a zygote: ``zygote.py``). Refills start when a run of
the key ends (not when it starts, so they do not compete with it), at most
``pool_refill_concurrency`` at a time, and warm up with the smallest CPU weight,
so live runs win the CPU. An empty pool never makes a run wait: it goes cold.

Usage::

    pool = SandboxPool(settings, factory)
    entry = pool.take(spec)          # None: run it cold
    ...; pool.refill(entry.key)      # once the run has ended
    await pool.close()
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict, deque
from collections.abc import Coroutine, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import structlog

from ..settings import Settings
from .base import Interpreter, RunSpec
from .box import Box

log = structlog.get_logger("python_executor.sandbox.pool")

BACKOFF_FIRST = 1.0  # seconds without refills of a key after a failed start, doubling
BACKOFF_MAX = 60.0
# A refill looks through a key's idle sandboxes for dead ones at most this often (a take
# drops the dead it meets on its way to a ready one): not a poll per sandbox per run.
PRUNE_EVERY = 1.0


@dataclass(frozen=True)
class PoolKey:
    interpreter: Interpreter
    launch_argv: tuple[str, ...]
    launch_env: tuple[tuple[str, str], ...]
    network: bool
    disk_mb: int
    open_files: int
    file_size_mb: int | None
    result_fd: int | None
    memory_mb: int | None  # fixed at start only without cgroups (RLIMIT_AS)


def pool_key(spec: RunSpec, launch_env: dict[str, str], *, cgroups: bool) -> PoolKey | None:
    """The key of sandboxes that can run ``spec``; None when none can (not pre-startable,
    or extra mounts, which belong to one request)."""
    if spec.prestart <= 0 or spec.mounts:
        return None
    limits = spec.limits
    return PoolKey(
        interpreter=spec.interpreter,
        launch_argv=spec.argv[: spec.prestart],
        launch_env=tuple(sorted(launch_env.items())),
        network=limits.network,
        disk_mb=limits.disk_mb,
        open_files=limits.open_files,
        file_size_mb=limits.file_size_mb,
        result_fd=spec.result_fd,
        memory_mb=None if cgroups else limits.memory_mb,
    )


@dataclass(eq=False)
class Entry:
    key: PoolKey
    box: Box
    workdir: Path


class Factory(Protocol):
    async def make(self, key: PoolKey, template: RunSpec) -> Entry | None:
        """A started sandbox for ``key`` (``template``: a run of that key), or None."""

    def pool_size(self, key: PoolKey) -> int:
        """How many sandboxes of ``key`` to keep (forks of a zygote cost less)."""

    async def destroy(self, entry: Entry) -> None:
        """Kill it and remove its workspace."""


@dataclass
class _Key:
    template: RunSpec
    idle: deque[Entry] = field(default_factory=deque)
    filling: int = 0
    failures: int = 0
    quiet_until: float = 0.0  # monotonic: no refill before (after failures)
    pruned_at: float = 0.0  # monotonic: the last look through ``idle`` for the dead


class SandboxPool:
    def __init__(self, settings: Settings, factory: Factory) -> None:
        self._size = settings.pool_size
        self._max_keys = max(1, settings.pool_max_keys)
        self._factory = factory
        self._keys: OrderedDict[PoolKey, _Key] = OrderedDict()  # least recently used first
        self._starting = asyncio.Semaphore(max(1, settings.pool_refill_concurrency))
        self._fills: set[asyncio.Task[None]] = set()
        self._destroys: set[asyncio.Task[None]] = set()
        self._retries: set[asyncio.TimerHandle] = set()  # refills after a backoff
        self._closed = False
        self.hits = 0
        self.misses = 0

    # --- taking ------------------------------------------------------------------------

    def take(self, key: PoolKey, spec: RunSpec) -> Entry | None:
        """A started sandbox of ``key`` (ready ones first), or None. The key is learned:
        kept warm from now on."""
        state = self._learn(key, spec)
        entry = self._pick(state)
        if entry is None:
            self.misses += 1
            self.refill(key)  # (the first run of a key; or the pool ran dry)
        else:
            self.hits += 1
        return entry

    def warm(self, key: PoolKey, spec: RunSpec) -> None:
        """Keep ``key`` warm from now on (as a first ``take`` would), without taking; the
        dead among its idle sandboxes are replaced now, whenever they were last looked for."""
        state = self._learn(key, spec)
        state.pruned_at = 0.0
        self.refill(key)

    def _learn(self, key: PoolKey, spec: RunSpec) -> _Key:
        state = self._keys.get(key)
        if state is None:
            state = self._keys[key] = _Key(template=spec)
            while len(self._keys) > self._max_keys:
                _, dropped = self._keys.popitem(last=False)
                self._discard(dropped.idle)
        self._keys.move_to_end(key)
        return state

    def _pick(self, state: _Key) -> Entry | None:
        """The first ready idle sandbox, else the first one alive (still starting); the
        dead met on the way are dropped. Usually the first one: one liveness check."""
        dead: list[Entry] = []
        entry = starting = None
        for candidate in state.idle:
            if candidate.box.ready():
                entry = candidate
                break
            if not candidate.box.alive():
                dead.append(candidate)
            elif starting is None:
                starting = candidate
        self._drop(state, dead)
        entry = entry or starting
        if entry is not None:
            state.idle.remove(entry)
        return entry

    # --- refilling ---------------------------------------------------------------------

    def refill(self, key: PoolKey) -> None:
        """Start what ``key`` lacks (in the background); call when a run of it ended."""
        state = self._keys.get(key)
        if state is None or self._closed:
            return
        now = time.monotonic()
        if now - state.pruned_at >= PRUNE_EVERY:  # the dead are replaced, not counted
            self._prune(state)
            state.pruned_at = now
        if now < state.quiet_until:
            return
        while len(state.idle) + state.filling < self._factory.pool_size(key):
            state.filling += 1
            spawn(self._fills, self._fill(key, state))

    async def _fill(self, key: PoolKey, state: _Key) -> None:
        entry: Entry | None = None
        try:
            async with self._starting:
                if self._keys.get(key) is state and not self._closed:
                    entry = await self._factory.make(key, state.template)
        except Exception:
            log.exception("pre-starting a sandbox failed")
        finally:
            state.filling -= 1
        if entry is None:
            self._failed(key, state)
        elif self._keys.get(key) is not state or self._closed:
            await self._factory.destroy(entry)  # the key was dropped meanwhile
        else:
            state.failures = 0
            state.idle.append(entry)

    def _failed(self, key: PoolKey, state: _Key) -> None:
        if self._closed:
            return
        state.failures += 1
        pause = min(BACKOFF_FIRST * 2 ** (state.failures - 1), BACKOFF_MAX)
        state.quiet_until = time.monotonic() + pause
        # Try again then, whether or not a run of the key comes along to ask for it.
        handle: asyncio.TimerHandle | None = None

        def retry() -> None:
            self._retries.discard(handle)
            self.refill(key)

        handle = asyncio.get_running_loop().call_later(pause, retry)
        self._retries.add(handle)

    def _prune(self, state: _Key) -> None:
        self._drop(state, [e for e in state.idle if not e.box.alive()])

    def _drop(self, state: _Key, dead: list[Entry]) -> None:
        for gone in dead:
            state.idle.remove(gone)
        self._discard(dead)

    def _discard(self, entries: Iterable[Entry]) -> None:
        for entry in list(entries):
            spawn(self._destroys, self._factory.destroy(entry))

    # --- state and shutdown --------------------------------------------------------------

    def describe(self) -> dict[str, Any]:
        keys = [
            {
                "python": key.interpreter.version,
                "network": key.network,
                "disk_mb": key.disk_mb,
                "idle": len(state.idle),
                "ready": sum(1 for e in state.idle if e.box.ready()),
                "starting": state.filling,
                "size": self._factory.pool_size(key),
            }
            for key, state in self._keys.items()
        ]
        return {"size": self._size, "keys": keys, "hits": self.hits, "misses": self.misses}

    def ready(self, key: PoolKey) -> int:
        """Sandboxes of ``key`` whose program waits for its job."""
        state = self._keys.get(key)
        return sum(1 for e in state.idle if e.box.ready()) if state is not None else 0

    async def close(self) -> None:
        """Stop refilling and destroy every idle sandbox."""
        self._closed = True
        for retry in self._retries:
            retry.cancel()
        for task in list(self._fills):  # a start cut short cleans up after itself
            task.cancel()
        await asyncio.gather(*self._fills, *self._destroys, return_exceptions=True)
        for state in self._keys.values():
            for entry in state.idle:
                await self._factory.destroy(entry)
            state.idle.clear()
        self._keys.clear()


def spawn(tasks: set[asyncio.Task[None]], work: Coroutine[Any, Any, None]) -> None:
    """Run ``work`` in the background, held in ``tasks`` until it is done (to be awaited
    or cancelled at shutdown)."""
    task = asyncio.get_running_loop().create_task(work)
    tasks.add(task)
    task.add_done_callback(tasks.discard)
