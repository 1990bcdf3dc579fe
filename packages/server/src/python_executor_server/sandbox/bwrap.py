"""The embedded sandbox: bubblewrap, cgroups, rlimits, seccomp, private tmpfs workspaces.

One run: ``prlimit`` sets the rlimits, ``setpriv`` drops to the unprivileged
host uid (``settings.sandbox_host_uid``), bwrap makes fresh user, pid, ipc,
uts, cgroup and network namespaces and blocks (``--block-fd``) once its
filesystem is ready. We read its namespace init's pid (``--info-fd``), move it
into the run's cgroups, attach the network if asked, and only then let it fork
the command: nothing of the run runs outside its limits. Output goes to the
sink as it arrives and is drained to EOF (the sink caps it; the program runs on).

Every process of a run is in its pid namespace and its cgroup: killing the
namespace init takes the namespace down (setsid'd and double-forked processes
included), and the cgroup is swept with SIGKILL until empty.

Without root: bwrap runs as the server's own uid, no cgroups (``RLIMIT_AS``
per process instead), plain work dirs without a size cap; ``describe()`` says so.

Usage::

    backend = BwrapBackend(settings)
    await backend.start()
    work = await backend.create_workspace("exe_...", disk_mb=64)
    outcome = await backend.run(spec, sink)
    await backend.remove_workspace(work)
    await backend.close()
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio

from ..errors import SandboxError
from ..settings import Settings
from . import seccomp
from .base import (
    SANDBOX_GID,
    SANDBOX_TMPDIR,
    SANDBOX_UID,
    SANDBOX_WORKDIR,
    Interpreter,
    OutputSink,
    RunOutcome,
    RunSpec,
)
from .cgroups import Cgroups, Slot, detect_cgroups
from .instance import new_instance_name
from .mounts import traversable_by
from .network import NetworkAttachment, attach_network, network_status
from .process import CappedBuffer, Child, Fds, PidHandle, feed, pump, spawn
from .rlimits import prlimit_argv
from .rootfs import HOSTNAME, RootFs
from .workspace import Workspaces, chown_tree

SIDE_CHANNEL_CAP = 1024 * 1024
SETUP_TIMEOUT = 30.0  # bwrap reporting its namespace init (a loaded host can be slow)
KILL_GRACE = 1.0  # after SIGKILL of the init, for bwrap to report and exit
DRAIN_GRACE = 5.0  # for the pipes to reach EOF once every process is gone


@dataclass(eq=False)
class _Live:
    """What one run holds; released by ``_cleanup`` whatever happened."""

    fds: Fds = field(default_factory=Fds)
    child: Child | None = None
    init: PidHandle | None = None
    slot: Slot | None = None
    network: NetworkAttachment | None = None
    done: anyio.Event = field(default_factory=anyio.Event)

    def kill(self) -> None:  # from outside the run's own task
        for process in (self.init, self.child):
            if process is not None:
                process.kill()


@dataclass
class _Layout:
    fds: dict[int, int]  # fd number in bwrap -> our fd
    info: int
    block: int
    seccomp: int | None


@dataclass
class _Pipes:
    out: tuple[int, int]
    err: tuple[int, int]
    info: tuple[int, int]
    block: tuple[int, int]
    stdin: tuple[int, int] | None
    result: tuple[int, int] | None

    @classmethod
    def create(cls, spec: RunSpec, fds: Fds) -> _Pipes:
        stdin = fds.pipe() if spec.stdin is not None else None
        result = fds.pipe() if spec.result_fd is not None else None
        return cls(fds.pipe(big=True), fds.pipe(big=True), fds.pipe(), fds.pipe(), stdin, result)


class BwrapBackend:
    name = "bwrap"

    def __init__(
        self, settings: Settings, interpreters: Mapping[str, Interpreter] | None = None
    ) -> None:
        self.settings = settings
        self._interpreters = dict(interpreters or {})
        self._root = os.geteuid() == 0
        self._uid = settings.sandbox_host_uid if self._root else os.getuid()
        self._instance = new_instance_name()
        self._bwrap = shutil.which("bwrap")
        self._setpriv = shutil.which("setpriv")
        self._prlimit = shutil.which("prlimit")
        self._version: str | None = None
        self._disable_userns = False
        self._seccomp = False
        self._cgroups: Cgroups | None = None
        self._rootfs = RootFs(
            settings.runs_path / ".sandbox" / self._instance, uid=self._uid, can_mount=self._root
        )
        self._workspaces = Workspaces(
            settings.runs_path,
            uid=self._uid,
            tmpfs=self._root,
            min_inodes=settings.max_archive_entries + 4096,
        )
        self._live: set[_Live] = set()
        self._started = False

    # --- lifecycle -----------------------------------------------------------------

    async def start(self) -> None:
        if self._bwrap is None:
            raise SandboxError("bubblewrap is not installed (apt-get install bubblewrap)")
        if self._prlimit is None or (self._root and self._setpriv is None):
            raise SandboxError("prlimit and setpriv are missing (apt-get install util-linux)")
        await self._probe_bwrap(self._bwrap)
        await anyio.to_thread.run_sync(self._prepare_runs_path)
        await anyio.to_thread.run_sync(self._rootfs.setup)
        for interp in self._interpreters.values():  # their aliases now, not on a first run
            await anyio.to_thread.run_sync(self._rootfs.interpreter_args, interp)
        self._cgroups = await anyio.to_thread.run_sync(
            detect_cgroups, self.settings.cgroup_root, self._instance
        )
        self._seccomp = self.settings.seccomp and seccomp.seccomp_available()
        self._started = True

    async def _probe_bwrap(self, bwrap: str) -> None:
        version = await anyio.run_process([bwrap, "--version"], check=False)
        found = re.search(rb"(\d+\.\d+(\.\d+)?)", version.stdout)
        self._version = found.group(1).decode() if found else None
        usage = await anyio.run_process([bwrap, "--help"], check=False)
        self._disable_userns = b"--disable-userns" in usage.stdout

    def _prepare_runs_path(self) -> None:
        runs = self.settings.runs_path
        runs.mkdir(parents=True, exist_ok=True)
        if self._root:
            os.chmod(runs, 0o711)
            if not traversable_by(runs / "x", self._uid, self._uid):
                raise SandboxError(
                    f"the sandbox uid {self._uid} cannot reach {runs}: every parent directory "
                    "needs o+x (set PYEXEC_RUN_DIR elsewhere)"
                )

    async def close(self) -> None:
        with anyio.move_on_after(10):  # each run's own cleanup reaps and releases
            for live in list(self._live):
                live.kill()
                await live.done.wait()
        if self._cgroups is not None:
            self._cgroups.close()
        await anyio.to_thread.run_sync(self._rootfs.close)
        self._started = False

    def describe(self) -> dict[str, Any]:
        cgroup = self._cgroups.version if self._cgroups else None
        try:
            network: dict[str, Any] = dict(network_status())
        except Exception as exc:  # health must answer even when the network part is broken
            network = {"error": str(exc)}
        return {
            "backend": self.name,
            "bwrap_version": self._version,
            "cgroup": cgroup,
            "memory_limit": "cgroup" if cgroup else "rlimit_as",
            "pids_limit": "cgroup" if cgroup else "none",
            "seccomp": self._seccomp,
            "network": network,
            "disk_limit": "tmpfs" if self._root else "none",
            "host_uid": self._uid,
        }

    # --- workspaces ----------------------------------------------------------------

    async def create_workspace(self, execution_id: str, disk_mb: int) -> Path:
        return await anyio.to_thread.run_sync(self._workspaces.create, execution_id, disk_mb)

    async def remove_workspace(self, path: Path) -> None:
        await anyio.to_thread.run_sync(self._workspaces.remove, path)

    # --- one run -------------------------------------------------------------------

    async def run(self, spec: RunSpec, sink: OutputSink) -> RunOutcome:
        if not self._started:
            raise SandboxError("the bwrap backend is not started")
        live = _Live()
        self._live.add(live)
        try:
            return await self._run(spec, sink, live)
        except (SandboxError, OSError) as exc:
            return RunOutcome(exit_code=None, error=f"sandbox setup failed: {exc}")
        finally:
            with anyio.CancelScope(shield=True):
                await self._cleanup(live)
            self._live.discard(live)
            live.done.set()

    async def _run(self, spec: RunSpec, sink: OutputSink, live: _Live) -> RunOutcome:
        if self._root:
            await anyio.to_thread.run_sync(chown_tree, spec.workdir, self._uid, self._uid)
        pipes = _Pipes.create(spec, live.fds)
        layout = self._layout(spec, pipes, live.fds)
        argv = self._argv(spec, layout)
        if self._cgroups is not None:
            live.slot = await self._cgroups.acquire()
            live.slot.configure(spec.limits)
        live.child = spawn(argv, layout.fds, env={})
        # Our copies of the child's ends go, except block's read end: a byte still
        # in it after the run means bwrap died before starting the command.
        live.fds.close(*(fd for fd in layout.fds.values() if fd != pipes.block[0]))
        return await self._supervise(spec, sink, live, pipes)

    def _layout(self, spec: RunSpec, pipes: _Pipes, fds: Fds) -> _Layout:
        """Which of our fds bwrap gets at which number: 0-2, the result pipe at
        ``result_fd``, info/block/seccomp on the lowest other numbers."""
        if spec.result_fd is not None and spec.result_fd < 3:
            raise SandboxError(f"result_fd must be 3 or more, not {spec.result_fd}")
        stdin = pipes.stdin[0] if pipes.stdin else fds.devnull()
        mapping = {0: stdin, 1: pipes.out[1], 2: pipes.err[1]}
        if pipes.result is not None and spec.result_fd is not None:
            mapping[spec.result_fd] = pipes.result[1]
        free = (n for n in range(3, 1024) if n != spec.result_fd)
        info, block = next(free), next(free)
        mapping[info], mapping[block] = pipes.info[1], pipes.block[0]
        seccomp_at = None
        if self._seccomp:
            seccomp_at = next(free)
            mapping[seccomp_at] = fds.memfd(seccomp.compile_filter(allow_inet=spec.limits.network))
        return _Layout(fds=mapping, info=info, block=block, seccomp=seccomp_at)

    def _argv(self, spec: RunSpec, layout: _Layout) -> list[str]:
        assert self._bwrap is not None
        args = [self._bwrap, "--unshare-user", "--uid", str(SANDBOX_UID), "--gid", str(SANDBOX_GID)]
        if self._disable_userns:
            args.append("--disable-userns")
        args += ["--unshare-pid", "--unshare-ipc", "--unshare-uts", "--unshare-net"]
        args += ["--unshare-cgroup-try", "--die-with-parent", "--new-session"]
        args += ["--hostname", HOSTNAME, "--cap-drop", "ALL", "--clearenv"]
        for key, value in spec.env.items():
            args += ["--setenv", key, value]
        args += self._rootfs.base_args(network=spec.limits.network)
        args += ["--bind", str(spec.workdir), SANDBOX_WORKDIR, *self._tmp_args(spec)]
        args += self._rootfs.interpreter_args(spec.interpreter)
        args += self._rootfs.mount_args(spec.mounts)
        args += ["--remount-ro", "/", "--chdir", SANDBOX_WORKDIR]
        args += ["--info-fd", str(layout.info), "--block-fd", str(layout.block)]
        if layout.seccomp is not None:
            args += ["--seccomp", str(layout.seccomp)]
        args += ["--", *spec.argv]
        return self._launcher(spec) + args

    def _launcher(self, spec: RunSpec) -> list[str]:
        """prlimit (limits for bwrap and all it starts), then setpriv to the sandbox uid."""
        assert self._prlimit is not None
        argv = prlimit_argv(self._prlimit, spec.limits, address_space=self._cgroups is None)
        if self._root:
            assert self._setpriv is not None
            uid = str(self._uid)
            argv += [self._setpriv, f"--reuid={uid}", f"--regid={uid}", "--clear-groups", "--"]
        return argv

    def _tmp_args(self, spec: RunSpec) -> list[str]:
        """The workspace's tmp/ at /tmp; a work dir not made by ``create_workspace``
        gets a private tmpfs of ``disk_mb`` instead."""
        tmp = self._workspaces.tmp_for(spec.workdir)
        if tmp.is_dir():
            return ["--bind", str(tmp), SANDBOX_TMPDIR]
        size = str(spec.limits.disk_mb * 1024 * 1024)
        return ["--perms", "1777", "--size", size, "--tmpfs", SANDBOX_TMPDIR]

    async def _supervise(
        self, spec: RunSpec, sink: OutputSink, live: _Live, pipes: _Pipes
    ) -> RunOutcome:
        assert live.child is not None
        side = CappedBuffer(SIDE_CHANNEL_CAP)
        head = CappedBuffer(4096)  # bwrap's own error, if it fails

        def on_stderr(data: bytes) -> None:
            head(data)
            sink.write("stderr", data)

        timed_out = False
        released = await self._release(spec, live, pipes)  # bwrap writes nothing before
        async with anyio.create_task_group() as tg:
            tg.start_soon(pump, pipes.out[0], lambda data: sink.write("stdout", data))
            tg.start_soon(pump, pipes.err[0], on_stderr)
            if pipes.result is not None:
                tg.start_soon(pump, pipes.result[0], side)
            if released:
                if pipes.stdin is not None:
                    tg.start_soon(self._feed_stdin, live.fds, pipes.stdin[1], spec.stdin or b"")
                with anyio.move_on_after(spec.limits.timeout_seconds) as scope:
                    await live.child.wait()
                timed_out = scope.cancelled_caught
            await self._terminate(live)
            tg.cancel_scope.deadline = anyio.current_time() + DRAIN_GRACE
        error = self._setup_error(pipes, live, bytes(head.data))
        return self._outcome(live, timed_out, bytes(side.data), error)

    async def _release(self, spec: RunSpec, live: _Live, pipes: _Pipes) -> bool:
        """Confine bwrap's namespace init, then let it start the command. False: bwrap
        ended (or hung) before reporting it."""
        info = CappedBuffer(4096)
        with anyio.move_on_after(SETUP_TIMEOUT):
            await pump(pipes.info[0], info)
        try:
            pid = int(json.loads(bytes(info.data))["child-pid"])
        except (ValueError, KeyError, TypeError):
            return False
        live.init = PidHandle(pid)
        if live.slot is not None:
            live.slot.add(pid)
        if spec.limits.network:
            live.network = await attach_network(pid, self.settings)
        os.write(pipes.block[1], b"x")
        return True

    @staticmethod
    async def _feed_stdin(fds: Fds, fd: int, data: bytes) -> None:
        try:
            await feed(fd, data)
        finally:
            fds.close(fd)  # EOF for the program

    def _setup_error(self, pipes: _Pipes, live: _Live, stderr_head: bytes) -> str | None:
        """bwrap never consumed the block byte (or never got it): it failed before
        starting the command, and said why on stderr."""
        if live.child is not None and live.child.returncode == 0:
            return None
        os.set_blocking(pipes.block[0], False)
        try:
            unread = live.init is None or os.read(pipes.block[0], 1) == b"x"
        except BlockingIOError:
            unread = False
        if not unread:
            return None
        message = stderr_head.decode("utf-8", "replace").strip().splitlines()
        return "sandbox setup failed: " + (message[-1] if message else "bwrap exited early")

    def _outcome(self, live: _Live, timed_out: bool, side: bytes, error: str | None) -> RunOutcome:
        assert live.child is not None
        code = live.child.returncode
        usage = live.slot.usage() if live.slot is not None else None
        return RunOutcome(
            exit_code=None if timed_out or error or code is None or code < 0 else code,
            timed_out=timed_out,
            oom_killed=bool(usage and usage.oom_killed),
            side_channel=bytes(side),
            cpu_ms=usage.cpu_ms if usage else None,
            peak_memory_mb=usage.peak_memory_mb if usage else None,
            error=error,
        )

    async def _terminate(self, live: _Live) -> None:
        """Kill every process of the run and reap bwrap. Idempotent, quick."""
        if live.init is not None:
            live.init.kill()  # the pid namespace goes down with its init
        if live.child is not None and live.child.returncode is None:
            with anyio.move_on_after(KILL_GRACE if live.init is not None else 0):
                await live.child.wait()
            live.child.kill()
            await live.child.wait()
        if live.slot is not None and live.slot.pids():
            await anyio.to_thread.run_sync(live.slot.kill_all)

    async def _cleanup(self, live: _Live) -> None:
        try:
            await self._terminate(live)
            if live.network is not None:
                await live.network.close()
        finally:
            live.fds.close_all()
            if live.init is not None:
                live.init.close()
            if live.slot is not None and self._cgroups is not None:
                self._cgroups.release(live.slot)
