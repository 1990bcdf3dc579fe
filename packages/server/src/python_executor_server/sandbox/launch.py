"""Starting one bwrap sandbox: its command line, fd layout, spawn and confinement.

``setpriv`` drops to the unprivileged host uid (as root), bwrap makes fresh user,
pid, ipc, uts, cgroup and network namespaces and blocks (``--block-fd``) once its
filesystem is ready. We read its namespace init's pid (``--info-fd``), set the
rlimits on it and move it into the run's cgroups, attach the network if asked, and
only then let it fork the command: nothing of the run runs outside its limits, and
every later process of the run inherits them.

A pre-startable command (``RunSpec.prestart``) is started as ``argv[:prestart]
--job-fd N`` with only the variables that act while a process starts
(``launch_env``); the rest of argv and the whole environment go over the job socket,
now (cold) or at hand-off (pool). Either way the program sees the same process. A
``-c`` program among them is compiled once per interpreter (``precompile.py``).

Usage::

    launcher = Launcher(...)
    box = Box()
    await launcher.start(spec, box)      # box.released: the command is starting
"""

from __future__ import annotations

import json
import os
import resource
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, replace
from pathlib import Path

import anyio

from ..settings import Settings
from . import seccomp
from .base import (
    JOB_FD_OPTION,
    SANDBOX_GID,
    SANDBOX_TMPDIR,
    SANDBOX_UID,
    SANDBOX_WORKDIR,
    RunSpec,
)
from .box import Box, Pipes
from .cgroups import Cgroups, Slot
from .network import attach_network
from .precompile import Precompiled, c_source, loader
from .process import CappedBuffer, Fds, PidHandle, pump, schedule
from .rlimits import prlimit_argv, rlimits_for
from .rootfs import HOSTNAME, RootFs
from .spawner import Spawner
from .zygote_source import zygote_source

SETUP_TIMEOUT = 30.0  # bwrap reporting its namespace init (a loaded host can be slow)
# Read by the dynamic loader, libc or the interpreter while a process starts: a
# pre-started process has them from its launch, so they are part of the pool key.
LAUNCH_VARS = ("LANG", "LANGUAGE", "TZ", "TZDIR", "GLIBC_TUNABLES")
LAUNCH_PREFIXES = ("LC_", "LD_", "MALLOC_")


def launch_env(env: Mapping[str, str]) -> dict[str, str]:
    return {k: v for k, v in env.items() if k in LAUNCH_VARS or k.startswith(LAUNCH_PREFIXES)}


@dataclass
class _Layout:
    fds: dict[int, int]  # fd number in bwrap -> our fd
    info: int
    block: int
    job: int | None
    seccomp: int | None
    code: int | None  # the precompiled -c program (precompile.py)


@dataclass(frozen=True)
class Tools:
    bwrap: str
    setpriv: str | None  # None: not root, bwrap runs as us
    disable_userns: bool  # bwrap can forbid user namespaces inside
    # util-linux prlimit, run before setpriv, when we may not set the limits of bwrap's
    # init from outside (root without CAP_SYS_RESOURCE, as in most containers).
    prlimit: str | None = None


class Launcher:
    def __init__(
        self,
        settings: Settings,
        tools: Tools,
        rootfs: RootFs,
        *,
        uid: int,
        seccomp: bool,
        cgroups: Cgroups | None,
    ) -> None:
        self.settings = settings
        self.tools = tools
        self.rootfs = rootfs
        self.uid = uid
        self.seccomp = seccomp
        self.cgroups = cgroups
        self.precompiled = Precompiled()
        self.spawner = Spawner()  # close() once every sandbox it started is gone

    async def start(
        self, spec: RunSpec, box: Box, tmp: Path | None, *, ahead: bool = False
    ) -> None:
        """Spawn bwrap for ``spec`` into ``box`` and confine it. ``tmp``: the host dir to
        show at /tmp (None: a private tmpfs). ``ahead``: started before its run (the
        pool): at SCHED_IDLE until ``box.wake()``, so it never slows a live run down.
        Raises OSError/SandboxError on setup failures of ours; bwrap's own shows as
        ``box.released`` staying False."""
        box.pipes = pipes = Pipes.create(
            box.fds, result=spec.result_fd is not None, job=spec.prestart > 0
        )
        layout = self._layout(spec, pipes, box.fds, await self._code(spec))
        argv = (
            self._launcher(spec) + self._bwrap_args(spec, layout, tmp) + self._command(spec, layout)
        )
        if self.cgroups is not None:
            box.slot = await self.cgroups.acquire()
            box.slot.configure(spec.limits, reset=not ahead)  # (at hand-off for the pool)
        with anyio.CancelScope(shield=True):  # a bwrap started must be known, to be killed
            box.child = child = await self.spawner.spawn(argv, layout.fds, env={})
        if ahead:  # before bwrap forks its init, mostly: that one is set again below
            schedule([child.pid], idle=True)
            box.idle = True
        # Our copies of the child's ends go, except block's read end: a byte still
        # in it after the run means bwrap died before starting the command.
        box.fds.close(*(fd for fd in layout.fds.values() if fd != pipes.block[0]))
        await self._release(spec, box, pipes, ahead)

    async def start_zygote(self, spec: RunSpec, box: Box, control: int) -> None:
        """Spawn the zygote of ``spec``'s pool key into ``box`` (``zygote.py``), confined
        like a run. ``box.released`` stays False if it failed. It is scheduled as any
        process (not at SCHED_IDLE as bwrap's pre-started sandboxes are): a fork costs
        little, and one that could starve would leave a busy host without sandboxes.

        Its command line is a pre-started program's to the byte, ``control`` (its end
        of the control socket) standing at the job fd's number: a run forked from it
        shows the same ``/proc/self/cmdline``. The driver tells it is a zygote from its
        source (``zygote_source.py``)."""
        box.pipes = pipes = Pipes.create(box.fds, result=False, job=False)
        source = c_source(spec.argv, spec.prestart)
        if source is None:
            raise ValueError("a zygote needs a pre-startable -c program")
        source = zygote_source(source)
        code = await self.precompiled.get(spec.interpreter, source)
        layout = self._layout(spec, pipes, box.fds, code, zygote_control=control)
        launch = [*spec.argv[: spec.prestart - 1], source]
        argv = self._launcher(spec) + self._bwrap_args(spec, layout, None, zygote=True)
        argv += self._command(replace(spec, argv=tuple(launch)), layout)
        if self.cgroups is not None:
            box.slot = await self.cgroups.acquire()
            box.slot.configure(spec.limits, reset=False)
        with anyio.CancelScope(shield=True):
            box.child = await self.spawner.spawn(argv, layout.fds, env={})
        box.fds.close(*(fd for fd in layout.fds.values() if fd != pipes.block[0]))
        await self._release(spec, box, pipes, ahead=False)

    async def _code(self, spec: RunSpec) -> bytes | None:
        source = c_source(spec.argv, spec.prestart) if spec.prestart else None
        return None if source is None else await self.precompiled.get(spec.interpreter, source)

    def _layout(
        self,
        spec: RunSpec,
        pipes: Pipes,
        fds: Fds,
        code: bytes | None,
        *,
        zygote_control: int | None = None,
    ) -> _Layout:
        """Which of our fds bwrap gets at which number: 0-2, the result pipe at
        ``result_fd``, info/block/job/seccomp/code on the lowest other numbers. A
        zygote's: its control socket at the job's number, no filter (its runs install
        it), and the numbers after as a pre-started program has them."""
        if spec.result_fd is not None and spec.result_fd < 3:
            raise ValueError(f"result_fd must be 3 or more, not {spec.result_fd}")
        mapping = {0: pipes.stdin[0], 1: pipes.out[1], 2: pipes.err[1]}
        if pipes.result is not None and spec.result_fd is not None:
            mapping[spec.result_fd] = pipes.result[1]
        free = _free_fds(spec.result_fd)
        info, block = next(free), next(free)
        mapping[info], mapping[block] = pipes.info[1], pipes.block[0]
        job = None
        job_end = pipes.job[1] if pipes.job is not None else zygote_control
        if job_end is not None:
            job = next(free)
            mapping[job] = job_end
        seccomp_at = None
        if self.seccomp:
            seccomp_at = next(free)
            if zygote_control is None:
                bpf = seccomp.compile_filter(allow_inet=spec.limits.network)
                mapping[seccomp_at] = fds.memfd(bpf)
            else:
                seccomp_at = None
        code_at = None
        if code is not None:
            code_at = next(free)
            mapping[code_at] = fds.memfd(code)
        return _Layout(mapping, info=info, block=block, job=job, seccomp=seccomp_at, code=code_at)

    def _bwrap_args(
        self, spec: RunSpec, layout: _Layout, tmp: Path | None, *, zygote: bool = False
    ) -> list[str]:
        """bwrap's options for one run; for a zygote (``zygote.py``) the same but for
        what each of its runs sets up itself: user namespaces allowed, no seccomp filter
        (both applied to each run), empty /work and /tmp (each run attaches its own)."""
        args = [self.tools.bwrap, "--unshare-user", "--uid", str(SANDBOX_UID)]
        args += ["--gid", str(SANDBOX_GID)]
        if self.tools.disable_userns and not zygote:
            args.append("--disable-userns")
        args += ["--unshare-pid", "--unshare-ipc", "--unshare-uts", "--unshare-net"]
        args += ["--unshare-cgroup-try", "--die-with-parent", "--new-session"]
        args += ["--hostname", HOSTNAME, "--cap-drop", "ALL", "--clearenv"]
        env = launch_env(spec.env) if spec.prestart else spec.env
        for key, value in env.items():
            args += ["--setenv", key, value]
        args += self.rootfs.base_args(network=spec.limits.network)
        if zygote:
            args += ["--dir", SANDBOX_WORKDIR, "--dir", SANDBOX_TMPDIR]
        else:
            args += ["--bind", str(spec.workdir), SANDBOX_WORKDIR, *self._tmp_args(spec, tmp)]
        args += self.rootfs.interpreter_args(spec.interpreter)
        args += self.rootfs.mount_args(spec.mounts)
        args += ["--remount-ro", "/", "--chdir", SANDBOX_WORKDIR]
        args += ["--info-fd", str(layout.info), "--block-fd", str(layout.block)]
        if layout.seccomp is not None:
            args += ["--seccomp", str(layout.seccomp)]
        return args

    @staticmethod
    def _command(spec: RunSpec, layout: _Layout) -> list[str]:
        if layout.job is None:
            return ["--", *spec.argv]
        launch = list(spec.argv[: spec.prestart])
        if layout.code is not None:
            launch[-1] = loader(layout.code)
        return ["--", *launch, JOB_FD_OPTION, str(layout.job)]

    def _launcher(self, spec: RunSpec) -> list[str]:
        """setpriv to the sandbox uid (as root); rlimits are set later, on bwrap's init,
        unless only prlimit on itself can."""
        argv = []
        if self.tools.prlimit is not None:
            argv = prlimit_argv(self.tools.prlimit, spec.limits, address_space=self._no_cgroups)
        if self.tools.setpriv is not None:
            uid = str(self.uid)
            argv += [self.tools.setpriv, f"--reuid={uid}", f"--regid={uid}", "--clear-groups"]
            argv.append("--")
        return argv

    @property
    def _no_cgroups(self) -> bool:
        return self.cgroups is None

    @staticmethod
    def _tmp_args(spec: RunSpec, tmp: Path | None) -> list[str]:
        if tmp is not None:
            return ["--bind", str(tmp), SANDBOX_TMPDIR]
        size = str(spec.limits.disk_mb * 1024 * 1024)
        return ["--perms", "1777", "--size", size, "--tmpfs", SANDBOX_TMPDIR]

    async def _release(self, spec: RunSpec, box: Box, pipes: Pipes, ahead: bool) -> None:
        """Confine bwrap's namespace init, then let it start the command. Stays
        unreleased when bwrap ended (or hung) before reporting it."""
        info = CappedBuffer(4096)
        with anyio.move_on_after(SETUP_TIMEOUT):
            await pump(pipes.info[0], info)
        try:
            pid = int(json.loads(bytes(info.data))["child-pid"])
        except (ValueError, KeyError, TypeError):
            return
        box.init = PidHandle(pid)
        # Writing cgroup.procs waits for an RCU grace period in each v1 hierarchy:
        # milliseconds the event loop must not spend blocked.
        await anyio.to_thread.run_sync(self.confine, spec, box.slot, pid, ahead)
        if spec.limits.network:
            box.network = await attach_network(pid, self.settings)
        os.write(pipes.block[1], b"x")
        box.released = True

    def confine(self, spec: RunSpec, slot: Slot | None, pid: int, ahead: bool) -> None:
        """The init's scheduling class, rlimits and cgroups: what it forks inherits them."""
        if ahead:
            schedule([pid], idle=True)
        if self.tools.prlimit is None:
            for which, value in rlimits_for(spec.limits, address_space=self._no_cgroups).items():
                _lower(pid, which, value)
        if slot is not None:
            slot.add(pid)


def _free_fds(result_fd: int | None) -> Iterator[int]:
    """The fd numbers bwrap gets ours at, in order: info, block, job, seccomp, code."""
    return (n for n in range(3, 1024) if n != result_fd)


def job_fd_number(result_fd: int | None) -> int:
    """Where a pre-started program finds its job socket (as ``_layout`` places it)."""
    free = _free_fds(result_fd)
    next(free), next(free)
    return next(free)


def _lower(pid: int, which: int, value: int) -> None:
    """Set a limit of ``pid`` (soft = hard), never above the hard limit it has: raising
    one needs a privilege an unprivileged server lacks."""
    _, hard = resource.prlimit(pid, which)
    if hard != resource.RLIM_INFINITY:
        value = min(value, hard)
    resource.prlimit(pid, which, (value, value))
