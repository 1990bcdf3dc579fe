"""Pooled sandboxes forked from a zygote instead of started one by one.

A pooled sandbox started by bwrap costs a bwrap and a fresh interpreter: ~30 ms of CPU,
which caps a 2-core host far below the throughput a pool should give. A zygote is one
bwrap sandbox per ``ZygoteKey`` (network off) running the eval driver with
``_zygote_main.py`` appended; it never runs user code. Each sandbox of the key is a fork
of it that makes everything a run owns anew, so nothing is shared between runs but the
read-only filesystem and the interpreter's pages (copy-on-write, never written by a
run before it forked):

- its own user, mount, pid, network, ipc, uts and cgroup namespaces (nested in the
  zygote's), pid 1 an init that ends the namespace with the program (a clone that
  shares the zygote's memory and runs C only: ``zygote_native.c``, built by
  ``native.py`` and sent to the zygote as a memfd);
- its own workspace: a size- and inode-capped tmpfs made here (``create_detached``),
  passed as a mount fd and attached at /work and /tmp in its mount namespace; the
  runner writes the project through ``/proc/self/fd/<fd>/work`` meanwhile;
- its own cgroup (the init and the program join it themselves, through the slot's
  cgroup.procs files opened here and passed with the request) and rlimits (the init
  lowers its own), before anything of the run is started;
- a fresh /proc of its pid namespace; no capability in any set, no_new_privs and the
  same seccomp filter as every other sandbox, installed before its program starts.

From there it is a pre-started sandbox like any other: ``Box`` supervises it, the job
goes over the job socket, the driver runs it. Its end is reported by its init (the
zygote's child, cloned into the run's namespaces) on the status pipe: ``StatusChild``
stands in for bwrap, and the init for bwrap's init.

Usage::

    zygotes = Zygotes(launcher, workspaces, cgroups, max_zygotes=4, max_file_mb=16384)
    made = await zygotes.sandbox(key, spec)     # (box, workdir), or None
    await zygotes.close()
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import dataclasses
import os
import socket
import struct
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import structlog

from . import seccomp
from .base import Interpreter, RunSpec
from .box import Box, Pipes
from .cgroups import Cgroups
from .launch import SETUP_TIMEOUT, Launcher, job_fd_number
from .native import native_library
from .pool import PoolKey
from .process import PidHandle, StatusChild, pump, readable, socket_of
from .rlimits import rlimits_for
from .rootfs import HOSTNAME
from .workspace import Workspaces

log = structlog.get_logger("python_executor.sandbox.zygote")

_CREDENTIALS = struct.Struct("3i")  # struct ucred: pid, uid, gid


@dataclass(eq=False)
class Zygote:
    box: Box
    control: socket.socket  # ours; the zygote reads fork requests from the other end
    forked: int = 0  # runs made so far
    said: bytearray = field(default_factory=bytearray)  # the last of its stderr
    listener: asyncio.Task[None] | None = None  # reads its stderr into ``said``


@dataclass(frozen=True)
class ZygoteKey:
    """What a zygote fixes of its forks. The rest of a pool key is set per fork: the
    workspace's size, the file size limit (and the cgroup limits, as for any pooled
    sandbox)."""

    interpreter: Interpreter
    launch_argv: tuple[str, ...]
    launch_env: tuple[tuple[str, str], ...]
    result_fd: int | None
    open_files: int

    @classmethod
    def of(cls, key: PoolKey) -> ZygoteKey:
        return cls(key.interpreter, key.launch_argv, key.launch_env, key.result_fd, key.open_files)


class Zygotes:
    """One zygote per ``ZygoteKey``, started with its first sandbox; at most
    ``max_zygotes``, the least recently used stopped first."""

    def __init__(
        self,
        launcher: Launcher,
        workspaces: Workspaces,
        cgroups: Cgroups,
        *,
        max_zygotes: int,
        max_file_mb: int,
    ) -> None:
        self._launcher = launcher
        self._workspaces = workspaces
        self._cgroups = cgroups
        self._max = max(1, max_zygotes)
        self._max_file_mb = max_file_mb  # the zygote's own limit: its forks' are lower
        self._zygotes: OrderedDict[ZygoteKey, Zygote] = OrderedDict()
        self._locks: dict[ZygoteKey, asyncio.Lock] = {}
        self._broken: set[ZygoteKey] = set()
        self.made = 0

    @staticmethod
    def serves(key: PoolKey) -> bool:
        """Keys a zygote can serve: no network (a run's own netns has only loopback);
        with cgroups (memory_mb is not fixed at start)."""
        return not key.network and key.memory_mb is None

    def broken(self, key: PoolKey) -> bool:
        """The zygote of ``key`` could not make a sandbox that worked: use bwrap."""
        return ZygoteKey.of(key) in self._broken

    def running(self, key: PoolKey) -> bool:
        """A zygote for ``key`` is up: a fork costs a few milliseconds, not a start."""
        zygote = self._zygotes.get(ZygoteKey.of(key))
        return zygote is not None and zygote.box.alive()

    async def sandbox(self, key: PoolKey, spec: RunSpec) -> tuple[Box, Path] | None:
        """A ready sandbox of ``key`` forked from its zygote, and its workdir; None when
        that failed (then ``broken(key)`` says whether to stop trying)."""
        zkey = ZygoteKey.of(key)
        zygote = await self._zygote(zkey, spec)
        if zygote is None:
            return None
        box = Box()
        fd, workdir = self._workspaces.create_detached(spec.limits.disk_mb)
        ready = False
        try:
            ready = await self._fork(zygote, spec, box, fd)
        finally:
            if not ready:  # (failed, or cut short)
                with anyio.CancelScope(shield=True):
                    await box.cleanup(self._cgroups)
                    self._workspaces.remove(workdir)
        if not ready:
            if zygote.forked == 0:  # never worked: a host where this cannot work
                self._broken.add(zkey)
                log.warning(
                    "the zygote cannot make sandboxes here; pooled sandboxes of this key "
                    "are started by bwrap instead",
                    zygote_said=zygote.said.decode(errors="replace").strip()[-500:],
                )
            if self._zygotes.get(zkey) is zygote:  # (not one started since by another fill)
                await self._stop(zkey)
            return None
        zygote.forked += 1
        self.made += 1
        return box, workdir

    async def _zygote(self, key: ZygoteKey, spec: RunSpec) -> Zygote | None:
        lock = self._locks.get(key) or self._locks.setdefault(key, asyncio.Lock())
        async with lock:
            zygote = self._zygotes.get(key)
            if zygote is not None and not zygote.box.alive():
                await self._stop(key)
                zygote = None
            if zygote is None and key not in self._broken:
                while len(self._zygotes) >= self._max:
                    await self._stop(next(iter(self._zygotes)))
                limits = dataclasses.replace(spec.limits, file_size_mb=self._max_file_mb)
                zygote = await self._start(key, dataclasses.replace(spec, limits=limits))
            if zygote is not None:
                self._zygotes.move_to_end(key)
            return zygote

    async def _start(self, key: ZygoteKey, spec: RunSpec) -> Zygote | None:
        library = await anyio.to_thread.run_sync(native_library)
        if library is None:  # (logged)
            self._broken.add(key)
            return None
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        box = Box()
        control = box.fds.adopt(theirs.detach())
        zygote = Zygote(box, ours)
        try:
            await self._launcher.start_zygote(spec, box, control)
        except BaseException:
            await self._close(zygote)
            raise
        if not box.released:
            log.warning("a zygote did not start", bwrap_said=box.stderr_head())
            self._broken.add(key)
            await self._close(zygote)
            return None
        assert box.pipes is not None
        if not _send_native(ours, library):
            log.warning("a zygote ended before it got its native part", said=box.stderr_head())
            self._broken.add(key)
            await self._close(zygote)
            return None
        zygote.listener = asyncio.get_running_loop().create_task(
            pump(box.pipes.err[0], lambda data: _keep_tail(zygote.said, data))
        )
        self._zygotes[key] = zygote
        return zygote

    async def _fork(self, zygote: Zygote, spec: RunSpec, box: Box, workspace: int) -> bool:
        """Have the zygote fork a sandbox for ``spec`` into ``box`` with the detached
        ``workspace``; True once its program waits for its job."""
        box.pipes = pipes = Pipes.create(box.fds, result=spec.result_fd is not None, job=True)
        assert pipes.job is not None
        with socket_of(pipes.job[0]) as ours:
            ours.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        named = {
            "stdin": pipes.stdin[0],
            "out": pipes.out[1],
            "err": pipes.err[1],
            "status": pipes.info[1],
            "job": pipes.job[1],
            "workspace": workspace,
        }
        if self._cgroups is not None:
            box.slot = await self._cgroups.acquire()
            box.slot.configure(spec.limits, reset=False)  # (reset at hand-off)
        job_at = job_fd_number(spec.result_fd)
        targets = {0: "stdin", 1: "out", 2: "err", job_at: "job"}
        if pipes.result is not None and spec.result_fd is not None:
            named["result"] = pipes.result[1]
            targets[spec.result_fd] = "result"
        sent = list(named.values())  # (ours to close once sent; the slot's stay open)
        if box.slot is not None:
            for i, procs in enumerate(box.slot.procs_fds()):  # G and H join it themselves
                named[f"cgroup{i}"] = procs
        lines = [f"hostname={HOSTNAME}", f"job_fd={job_at}"]
        # Set by the fork on itself: lowering one's own needs no privilege.
        limits = rlimits_for(spec.limits, address_space=False)
        lines += [f"rlimit.{which}={value}" for which, value in limits.items()]
        lines += [f"fd.{name}={i}" for i, name in enumerate(named)]
        lines += [f"target.{number}={name}" for number, name in targets.items()]
        bpf = seccomp.compile_filter(allow_inet=False) if self._launcher.seccomp else b""
        message = "\n".join(lines).encode() + b"\n\n" + bpf
        rights = array.array("i", named.values())
        try:
            zygote.control.sendmsg([message], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, rights)])
        except OSError:
            return False  # the zygote is gone
        box.fds.close(*(fd for fd in sent if fd != workspace))
        init = await _peer_pid(pipes.job[0])  # G, the run's init
        if init is None:
            return False
        box.init = PidHandle(init)
        box.child = StatusChild(box.init, pipes.info[0])
        box.released = True
        await readable(pipes.job[0], SETUP_TIMEOUT)  # its byte, or the socket's end if it died
        return box.ready()

    def describe(self) -> dict[str, Any]:
        return {"zygotes": len(self._zygotes), "made": self.made, "broken": len(self._broken)}

    async def _stop(self, key: ZygoteKey) -> None:
        zygote = self._zygotes.pop(key, None)
        if zygote is not None:
            await self._close(zygote)

    async def _close(self, zygote: Zygote) -> None:
        zygote.control.close()  # it exits when it reads the end
        if zygote.listener is not None:  # before its fd is closed (and its number reused)
            zygote.listener.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await zygote.listener
        with anyio.CancelScope(shield=True):
            await zygote.box.cleanup(self._cgroups)

    async def close(self) -> None:
        for key in list(self._zygotes):
            await self._stop(key)


def _send_native(control: socket.socket, library: bytes) -> bool:
    """The zygote's first message: its native part, as a memfd (nothing to mount)."""
    fd = os.memfd_create("python-executor-zygote", os.MFD_CLOEXEC)
    try:
        os.write(fd, library)
        control.sendmsg(
            [b"native"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]))]
        )
    except OSError:
        return False  # it is gone
    finally:
        os.close(fd)
    return True


def _keep_tail(buffer: bytearray, data: bytes) -> None:
    buffer += data
    del buffer[:-4096]
    for line in data.decode(errors="replace").splitlines():
        if line.strip():
            log.warning("zygote", said=line.strip())


async def _peer_pid(fd: int) -> int | None:
    """The pid (in our namespace) of the forked run's init, from the credentials of the
    first byte on the job socket (the init's); None when it ended or did not report in
    time."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + SETUP_TIMEOUT
    with socket_of(fd) as sock:
        sock.setblocking(False)
        while await readable(fd, deadline - loop.time()):
            try:
                data, ancillary, _, _ = sock.recvmsg(1, socket.CMSG_SPACE(_CREDENTIALS.size))
            except BlockingIOError:
                continue
            return _pid_from(ancillary) if data == b"c" else None
    return None


def _pid_from(ancillary: Iterable[tuple[int, int, bytes]]) -> int | None:
    for level, kind, payload in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
            pid = _CREDENTIALS.unpack(payload[: _CREDENTIALS.size])[0]
            return pid if pid > 0 else None
    return None
