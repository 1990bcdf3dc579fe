"""Per-run cgroups: memory with swap included, pids, CPU weight; usage and OOM kills.

cgroup v2 is used when the unified hierarchy offers the memory and pids
controllers; otherwise v1 (the memory, pids, cpu and cpuacct hierarchies), as
on hybrid hosts. Our cgroups live at ``<hierarchy>/<cgroup_root>/<instance>/<slot>``;
``<instance>`` starts with the server's pid so that ``start()`` of a later
server can reap the leftovers of a crashed one without touching a live one.

v1 slots are created once and reused (writing a few control files costs a
seventh of a mkdir/rmdir in every hierarchy); v2 slots are created per run
(one hierarchy, and memory.peak cannot be reset on older kernels).

``configure`` may be called again while processes run in the slot (a pre-started
sandbox handed a run with other limits): it writes only the limits that change, and
restarts the usage counters, so usage covers what ran since.

Usage::

    cgroups = detect_cgroups(settings.cgroup_root, instance)   # None: no cgroups
    slot = await cgroups.acquire()
    slot.configure(limits); slot.add(pid)
    ... ; slot.kill_all(); usage = slot.usage(); cgroups.release(slot)
"""

from __future__ import annotations

import contextlib
import errno
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import anyio

from . import cgroupfs as fs
from .base import Limits
from .cgroupfs import reap_stale, v1_mounts, v2_mount

MIB = 1024 * 1024
# A reused v1 slot still charged with this much (page cache, tmpfs pages of a
# kept work dir) is emptied, or replaced when emptying does not help.
_DIRTY_BYTES = 2 * MIB


@dataclass(frozen=True)
class Usage:
    cpu_ms: int | None
    peak_memory_mb: float | None
    oom_killed: bool


class Slot(Protocol):
    def configure(self, limits: Limits, *, reset: bool = True) -> None:
        """Set ``limits`` (only what changed); ``reset``: restart the usage counters."""

    def add(self, pid: int) -> None: ...
    def procs_fds(self) -> list[int]:
        """Its cgroup.procs files, open for writing (kept while the slot lives): a process
        that gets them joins the slot by writing "0" (itself) to each; the kernel checks
        the credentials they were opened with (ours)."""
        ...

    def pids(self) -> list[int]: ...
    def signal_all(self, signum: int) -> None: ...
    def kill_all(self) -> bool: ...
    def usage(self) -> Usage: ...


class Cgroups(Protocol):
    version: str

    async def acquire(self) -> Slot: ...
    def release(self, slot: Slot) -> None: ...
    def close(self) -> None: ...


# --- v1 -----------------------------------------------------------------------------


class V1Slot:
    def __init__(self, dirs: dict[str, Path]) -> None:
        self.dirs = dirs  # controller -> directory (co-mounted controllers share one)
        self._oom_base = 0
        self._files = fs.ControlFiles()  # (v1 slots are reused: their files stay open)
        self._set = fs.Written(self._files.write)
        self._paths: dict[tuple[str, str], str] = {}  # a few control files, each run
        self._procs_fds: list[int] = []

    def _file(self, controller: str, name: str) -> str:
        path = self._paths.get((controller, name))
        if path is None:
            path = self._paths[controller, name] = os.path.join(self.dirs[controller], name)
        return path

    def _unique_dirs(self) -> list[Path]:
        return list(dict.fromkeys(self.dirs.values()))

    def create(self) -> None:
        for d in self._unique_dirs():
            d.mkdir(exist_ok=True)

    def remove(self) -> None:
        _close_all(self._procs_fds)
        self._files.close()
        for d in self._unique_dirs():
            fs.rmdir(d)

    def charged_bytes(self) -> int:
        return self._read_int("memory", "memory.usage_in_bytes") or 0

    def empty_charges(self) -> None:
        with contextlib.suppress(OSError):
            self._files.write(self._file("memory", "memory.force_empty"), "0")

    def _read_int(self, controller: str, name: str) -> int | None:
        return fs.read_int(self._file(controller, name), self._files.read)

    def configure(self, limits: Limits, *, reset: bool = True) -> None:
        self._set_memory(str(limits.memory_mb * MIB))
        self._set(self._file("pids", "pids.max"), str(limits.pids))
        if "cpu" in self.dirs:
            shares = str(min(max(limits.cpu_shares, 2), 262144))
            self._set(self._file("cpu", "cpu.shares"), shares)
        if reset:
            self._reset_counters()

    def _set_memory(self, limit: str) -> None:
        memsw = self._file("memory", "memory.memsw.limit_in_bytes")
        if self._set.holds(self._file("memory", "memory.limit_in_bytes"), limit):
            return
        has_memsw = os.path.exists(memsw)  # (only when the limit changes)
        if has_memsw:  # memsw may never be below the memory limit: lift it first
            self._set(memsw, "-1")
        self._set(self._file("memory", "memory.limit_in_bytes"), limit)
        if has_memsw:
            self._set(memsw, limit)

    def _reset_counters(self) -> None:
        for name in ("memory.max_usage_in_bytes", "memory.failcnt", "memory.memsw.failcnt"):
            with contextlib.suppress(FileNotFoundError):
                self._files.write(self._file("memory", name), "0")
        if "cpuacct" in self.dirs:
            self._files.write(self._file("cpuacct", "cpuacct.usage"), "0")
        self._oom_base = self._oom_count()

    def _oom_count(self) -> int:
        oom_control = self._file("memory", "memory.oom_control")
        count = fs.keyed(oom_control, "oom_kill", self._files.read)
        if count is None:  # kernels before 4.13: hitting the limit is the best hint
            count = self._read_int("memory", "memory.memsw.failcnt") or 0
        return count

    def add(self, pid: int) -> None:
        for d in self._unique_dirs():
            fs.write(d / "cgroup.procs", str(pid))

    def procs_fds(self) -> list[int]:
        if not self._procs_fds:
            self._procs_fds = [_open_procs(d) for d in self._unique_dirs()]
        return self._procs_fds

    # cgroup.procs is opened afresh for every read: v1 keeps the pid list it read for an
    # open file and hands it out again to reads at offset 0 for up to a second.
    def pids(self) -> list[int]:
        return fs.procs(self.dirs["pids"])

    def signal_all(self, signum: int) -> None:
        fs.signal_all(self.dirs["pids"], signum)

    def kill_all(self) -> bool:
        return fs.kill_loop(self.dirs["pids"])

    def usage(self) -> Usage:
        cpu_ns = self._read_int("cpuacct", "cpuacct.usage") if "cpuacct" in self.dirs else None
        peak = self._read_int("memory", "memory.max_usage_in_bytes")
        return Usage(
            cpu_ms=None if cpu_ns is None else cpu_ns // 1_000_000,
            peak_memory_mb=None if peak is None else round(peak / MIB, 1),
            oom_killed=self._oom_count() > self._oom_base,
        )


class V1Cgroups:
    version = "v1"

    def __init__(self, mounts: dict[str, Path], root_name: str, instance: str) -> None:
        self._trees = {c: p / root_name for c, p in mounts.items()}
        self._bases = {c: t / instance for c, t in self._trees.items()}
        self._free: list[V1Slot] = []
        self._all: set[V1Slot] = set()
        self._counter = 0

    def setup(self) -> None:
        for tree in dict.fromkeys(self._trees.values()):
            tree.mkdir(exist_ok=True)
            reap_stale(tree)
        for base in self._bases.values():
            base.mkdir(exist_ok=True)

    def _new_slot(self) -> V1Slot:
        self._counter += 1
        slot = V1Slot({c: b / f"s{self._counter}" for c, b in self._bases.items()})
        slot.create()
        self._all.add(slot)
        return slot

    async def acquire(self) -> Slot:
        while self._free:
            slot = self._free.pop()
            if slot.charged_bytes() <= _DIRTY_BYTES:
                return slot
            await anyio.to_thread.run_sync(slot.empty_charges)
            if slot.charged_bytes() <= _DIRTY_BYTES:
                return slot
            self._retire(slot)  # charges held by files that still exist
        return self._new_slot()

    def release(self, slot: Slot) -> None:
        assert isinstance(slot, V1Slot)
        if slot.pids():
            self._retire(slot)
        else:
            self._free.append(slot)

    def _retire(self, slot: V1Slot) -> None:
        self._all.discard(slot)
        with contextlib.suppress(OSError):
            slot.kill_all()
            slot.remove()

    def close(self) -> None:
        for slot in list(self._all):
            self._retire(slot)
        self._free.clear()
        for directory in [*self._bases.values(), *self._trees.values()]:
            with contextlib.suppress(OSError):  # the tree stays while another server uses it
                fs.rmdir(directory)


# --- v2 -----------------------------------------------------------------------------


class V2Slot:
    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self._set = fs.Written()
        self._cpu_base = 0  # usage_usec cannot be reset: subtracted instead
        self._procs_fds: list[int] = []

    def configure(self, limits: Limits, *, reset: bool = True) -> None:
        self._set(self.dir / "memory.max", str(limits.memory_mb * MIB))
        with contextlib.suppress(FileNotFoundError):
            self._set(self.dir / "memory.swap.max", "0")
        self._set(self.dir / "pids.max", str(limits.pids))
        with contextlib.suppress(FileNotFoundError):
            shares = min(max(limits.cpu_shares, 2), 262144)
            self._set(self.dir / "cpu.weight", str(1 + ((shares - 2) * 9999) // 262142))
        # memory.peak stays (resetting it is per open file on recent kernels only): a
        # pre-started sandbox's peak includes its interpreter's start, as a cold one's does.
        if reset:
            self._cpu_base = fs.keyed(self.dir / "cpu.stat", "usage_usec") or 0

    def add(self, pid: int) -> None:
        fs.write(self.dir / "cgroup.procs", str(pid))

    def procs_fds(self) -> list[int]:
        if not self._procs_fds:
            self._procs_fds = [_open_procs(self.dir)]
        return self._procs_fds

    def close(self) -> None:
        _close_all(self._procs_fds)

    def pids(self) -> list[int]:
        return fs.procs(self.dir)

    def signal_all(self, signum: int) -> None:
        fs.signal_all(self.dir, signum)

    def kill_all(self) -> bool:
        with contextlib.suppress(FileNotFoundError):
            fs.write(self.dir / "cgroup.kill", "1")
        return fs.kill_loop(self.dir)

    def usage(self) -> Usage:
        usec = fs.keyed(self.dir / "cpu.stat", "usage_usec")
        usec = None if usec is None else usec - self._cpu_base
        peak = fs.read_int(self.dir / "memory.peak")
        return Usage(
            cpu_ms=None if usec is None else usec // 1000,
            peak_memory_mb=None if peak is None else round(peak / MIB, 1),
            oom_killed=(fs.keyed(self.dir / "memory.events", "oom_kill") or 0) > 0,
        )


class V2Cgroups:
    version = "v2"

    def __init__(self, mount: Path, root_name: str, instance: str) -> None:
        self._mount = mount
        self._tree = mount / root_name
        self._base = self._tree / instance
        self._live: set[V2Slot] = set()
        self._counter = 0

    def setup(self) -> None:
        self._tree.mkdir(exist_ok=True)
        reap_stale(self._tree)
        self._base.mkdir(exist_ok=True)
        for parent in (self._mount, self._tree, self._base):
            offered = set(fs.read(parent / "cgroup.controllers").split())
            wanted = [c for c in ("memory", "pids", "cpu") if c in offered]
            fs.write(parent / "cgroup.subtree_control", " ".join("+" + c for c in wanted))

    async def acquire(self) -> Slot:
        self._counter += 1
        slot = V2Slot(self._base / f"r{self._counter}")
        slot.dir.mkdir()
        self._live.add(slot)
        return slot

    def release(self, slot: Slot) -> None:
        assert isinstance(slot, V2Slot)
        self._live.discard(slot)
        slot.close()
        slot.kill_all()
        try:
            os.rmdir(slot.dir)
        except OSError as exc:
            if exc.errno != errno.ENOENT:
                raise

    def close(self) -> None:
        for slot in list(self._live):
            with contextlib.suppress(OSError):
                self.release(slot)
        for directory in (self._base, self._tree):
            with contextlib.suppress(OSError):  # the tree stays while another server uses it
                fs.rmdir(directory)


def _open_procs(directory: Path) -> int:
    return os.open(directory / "cgroup.procs", os.O_WRONLY | os.O_CLOEXEC)


def _close_all(fds: list[int]) -> None:
    while fds:
        os.close(fds.pop())


def detect_cgroups(root_name: str, instance: str) -> V1Cgroups | V2Cgroups | None:
    """The cgroup manager this host supports (set up), or None (not root, no controllers)."""
    if os.geteuid() != 0:
        return None
    mount = v2_mount()
    if mount is not None:
        v2 = V2Cgroups(mount, root_name, instance)
        try:
            v2.setup()
            return v2
        except OSError:
            v2.close()
    mounts = v1_mounts()
    if "memory" in mounts and "pids" in mounts:
        v1 = V1Cgroups(mounts, root_name, instance)
        v1.setup()
        return v1
    return None
