"""The embedded sandbox: bubblewrap, cgroups, rlimits, seccomp, private tmpfs workspaces.

One run is one sandbox (``launch.py`` starts it, ``box.py`` supervises it): fresh
user, pid, ipc, uts, cgroup and network namespaces, the unprivileged host uid
(``settings.sandbox_host_uid``), its own cgroup, rlimits and seccomp filter, its
own tmpfs at /work and /tmp. Runs of a pre-startable program (the eval driver,
``RunSpec.prestart``) that ``create_workspace`` was told about can be handed to a
sandbox started ahead of time (``pool.py``): the workspace returned is then that
sandbox's, and ``run`` adjusts its cgroup and sends the job. Everything else, and
every run when the pool has none ready, starts cold.

Without root: bwrap runs as the server's own uid, no cgroups (``RLIMIT_AS``
per process instead), plain work dirs without a size cap; ``describe()`` says so.

Usage::

    backend = BwrapBackend(settings)
    await backend.start()
    work = await backend.create_workspace("exe_...", disk_mb=64, spec=spec)
    outcome = await backend.run(dataclasses.replace(spec, workdir=work), sink)
    await backend.remove_workspace(work)
    await backend.close()
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import os
import re
import shutil
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any

import anyio
import structlog

from ..errors import SandboxError
from ..settings import Settings
from . import seccomp
from .base import SANDBOX_WORKDIR, Interpreter, OutputSink, RunOutcome, RunSpec, encode_job
from .box import Box
from .cgroups import Cgroups, detect_cgroups
from .instance import new_instance_name
from .launch import Launcher, Tools, launch_env
from .mounts import traversable_by
from .network import network_status
from .pool import Entry, PoolKey, SandboxPool, pool_key, spawn
from .rlimits import may_limit_others
from .rootfs import RootFs
from .workspace import DETACHED_PREFIX, POOL_PREFIX, Workspaces, chown_tree
from .zygote import Zygotes

log = structlog.get_logger("python_executor.sandbox.bwrap")
_Launch = Callable[[Box, RunSpec], Awaitable[None]]


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
        self._version: str | None = None
        self._cgroups: Cgroups | None = None
        self._launcher: Launcher | None = None
        self._rootfs = RootFs(
            settings.runs_path / ".sandbox" / self._instance, uid=self._uid, can_mount=self._root
        )
        self._workspaces = Workspaces(
            settings.runs_path,
            uid=self._uid,
            tmpfs=self._root,
            min_inodes=settings.max_archive_entries + 4096,
        )
        # Kept work dirs are named after their runs: a pooled sandbox's is not.
        pooled = settings.pool_enabled and not settings.keep_workdirs
        self._pool = SandboxPool(settings, self) if pooled else None
        self._zygotes: Zygotes | None = None
        self._claimed: dict[Path, Entry] = {}  # pooled workspaces handed out, run pending
        self._refills: dict[Path, PoolKey] = {}  # run ended, workspace not yet removed
        self._names = itertools.count(1)
        self._live: set[Box] = set()
        self._ending: set[asyncio.Task[None]] = set()  # of ended runs: NATs, forks' inits

    # --- lifecycle -----------------------------------------------------------------

    async def start(self) -> None:
        tools = await self._tools()
        await anyio.to_thread.run_sync(self._prepare_runs_path)
        await anyio.to_thread.run_sync(self._rootfs.setup)
        for interp in self._interpreters.values():  # their aliases now, not on a first run
            await anyio.to_thread.run_sync(self._rootfs.interpreter_args, interp)
        self._cgroups = await anyio.to_thread.run_sync(
            detect_cgroups, self.settings.cgroup_root, self._instance
        )
        use_seccomp = self.settings.seccomp and seccomp.seccomp_available()
        self._launcher = Launcher(
            self.settings,
            tools,
            self._rootfs,
            uid=self._uid,
            seccomp=use_seccomp,
            cgroups=self._cgroups,
        )
        # A zygote's runs install the filter themselves, and it is what keeps them from
        # making user namespaces (bwrap's --disable-userns cannot apply to its forks).
        settings = self.settings
        zygote = settings.pool_zygote and use_seccomp and self._pool is not None
        if zygote and self._root and self._cgroups is not None:
            self._zygotes = Zygotes(
                self._launcher,
                self._workspaces,
                self._cgroups,
                max_zygotes=settings.pool_max_keys,
                max_file_mb=settings.max_disk_mb,
            )

    async def _tools(self) -> Tools:
        bwrap, setpriv, prlimit = (shutil.which(n) for n in ("bwrap", "setpriv", "prlimit"))
        if bwrap is None:
            raise SandboxError("bubblewrap is not installed (apt-get install bubblewrap)")
        outside = may_limit_others()
        if (self._root and setpriv is None) or (not outside and prlimit is None):
            raise SandboxError("prlimit and setpriv are missing (apt-get install util-linux)")
        version = await anyio.run_process([bwrap, "--version"], check=False)
        found = re.search(rb"(\d+\.\d+(\.\d+)?)", version.stdout)
        self._version = found.group(1).decode() if found else None
        usage = await anyio.run_process([bwrap, "--help"], check=False)
        return Tools(
            bwrap=bwrap,
            setpriv=setpriv if self._root else None,
            disable_userns=b"--disable-userns" in usage.stdout,
            prlimit=None if outside else prlimit,
        )

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
        self._workspaces.reap_stale()  # of pooled sandboxes of a server that died

    async def close(self) -> None:
        if self._pool is not None:
            await self._pool.close()
        if self._zygotes is not None:
            await self._zygotes.close()
        for entry in list(self._claimed.values()):
            await self.destroy(entry)
        self._claimed.clear()
        with anyio.move_on_after(10):  # each run's own cleanup reaps and releases
            for box in list(self._live):
                box.kill()
                await box.done.wait()
        await asyncio.gather(*self._ending, return_exceptions=True)
        if self._cgroups is not None:
            self._cgroups.close()
        await anyio.to_thread.run_sync(self._rootfs.close)
        if self._launcher is not None:
            await anyio.to_thread.run_sync(self._launcher.spawner.close)
        self._launcher = None

    def describe(self) -> dict[str, Any]:
        cgroup = self._cgroups.version if self._cgroups else None
        try:
            network: dict[str, Any] = dict(network_status())
        except Exception as exc:  # health must answer even when the network part is broken
            network = {"error": str(exc)}
        launcher = self._launcher
        return {
            "backend": self.name,
            "bwrap_version": self._version,
            "cgroup": cgroup,
            "memory_limit": "cgroup" if cgroup else "rlimit_as",
            "pids_limit": "cgroup" if cgroup else "none",
            "seccomp": bool(launcher and launcher.seccomp),
            "network": network,
            "disk_limit": "tmpfs" if self._root else "none",
            "host_uid": self._uid,
            "pool": self._pool.describe() if self._pool is not None else {"enabled": False},
            "zygote": self._zygotes.describe() if self._zygotes is not None else None,
        }

    def warm(self, spec: RunSpec) -> None:
        key = self._key(spec)
        if self._pool is not None and key is not None:
            self._pool.warm(key, spec)

    async def wait_warm(self, spec: RunSpec, count: int = 1, within: float = 30) -> bool:
        """Keep ``spec``'s key warm and wait until ``count`` of its sandboxes are ready
        (tests, benchmarks). False: no pool, not poolable, or not within ``within`` s."""
        key = self._key(spec)
        if self._pool is None or key is None:
            return False
        self._pool.warm(key, spec)
        with anyio.move_on_after(within):
            while self._pool.ready(key) < count:  # noqa: ASYNC110 - sandboxes starting elsewhere
                await anyio.sleep(0.01)
            return True
        return False

    # --- workspaces ----------------------------------------------------------------

    async def create_workspace(
        self, execution_id: str, disk_mb: int, spec: RunSpec | None = None
    ) -> Path:
        key = self._key(spec) if spec is not None and spec.limits.disk_mb == disk_mb else None
        if key is not None and self._pool is not None and spec is not None:
            entry = self._pool.take(key, spec)
            zygotes = self._forking(key)
            if entry is None and zygotes is not None and zygotes.running(key):
                # None ready: a fork now costs less than a cold start, and waits less
                entry = await self.make(key, spec)
            if entry is not None:
                self._claimed[entry.workdir] = entry
                return entry.workdir
        return await anyio.to_thread.run_sync(self._workspaces.create, execution_id, disk_mb)

    async def remove_workspace(self, path: Path) -> None:
        key = self._refills.pop(path, None)
        try:
            entry = self._claimed.pop(path, None)
            if entry is not None:  # handed out, never run: destroyed, and replaced
                key = entry.key
                await self.destroy(entry)
            await self._blocking(self._workspaces.remove, path)
        finally:
            if key is not None and self._pool is not None:
                self._pool.refill(key)

    async def _blocking(self, work: Callable[[Path], None], workdir: Path) -> None:
        """``work`` on the workspace: inline when it holds a few files (an eval run's),
        where a thread hop would cost more than the work, else in a thread."""
        if self._workspaces.holds_little(workdir):
            work(workdir)
        else:
            await anyio.to_thread.run_sync(work, workdir)

    # --- one run -------------------------------------------------------------------

    async def run(self, spec: RunSpec, sink: OutputSink) -> RunOutcome:
        if self._launcher is None:
            raise SandboxError("the bwrap backend is not started")
        entry = self._claimed.pop(spec.workdir, None)
        key = self._key(spec)
        try:
            if entry is not None and entry.key == key and await self._adjust(entry.box, spec):
                if self._pool is not None and self._forking(entry.key) is not None:
                    # A fork's replacement (a millisecond of the loop's time) starts once
                    # this task first waits: with the job sent, while the program runs.
                    # After the answer, it would hold up a client's next request. One
                    # started by bwrap (network on) costs tens of milliseconds of CPU: it
                    # would slow the run down, so it waits for the answer (below).
                    asyncio.get_running_loop().call_soon(self._pool.refill, entry.key)
                return await self._supervised(entry.box, spec, sink, None)
            if entry is not None:  # no longer fits, or died: its workspace runs cold
                await self._release_box(entry.box)
                if str(spec.workdir).startswith(DETACHED_PREFIX):  # bwrap cannot bind it
                    return await self._cold_copy(spec, sink)
            return await self._supervised(Box(), spec, sink, self._launch)
        finally:
            if key is not None and self._pool is not None:
                # Once the workspace goes (the runner removes it after the answer): a
                # bwrap-started sandbox's replacement, and what failed or died meanwhile
                # (a forked one's replacement started with the run; a cold run's with
                # its miss).
                self._refills[spec.workdir] = key

    async def _cold_copy(self, spec: RunSpec, sink: OutputSink) -> RunOutcome:
        """Run cold what was written to the detached workspace of a forked sandbox that
        died before its run: in a copy of it (the runner removes the original)."""
        workdir = await anyio.to_thread.run_sync(
            self._workspaces.create, spec.execution_id, spec.limits.disk_mb
        )
        try:
            await anyio.to_thread.run_sync(_copy_tree, spec.workdir, workdir)
            cold = dataclasses.replace(spec, workdir=workdir)
            return await self._supervised(Box(), cold, sink, self._launch)
        finally:
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(self._workspaces.remove, workdir)

    def _key(self, spec: RunSpec) -> PoolKey | None:
        return pool_key(spec, launch_env(spec.env), cgroups=self._cgroups is not None)

    async def _supervised(
        self, box: Box, spec: RunSpec, sink: OutputSink, launch: _Launch | None
    ) -> RunOutcome:
        """Start ``box`` with ``launch`` unless it is started, then run ``spec`` in it."""
        self._live.add(box)
        try:
            if self._root:
                await self._blocking(self._give_to_sandbox_user, spec.workdir)
            if launch is not None:
                await launch(box, spec)
            job = encode_job(spec.argv[spec.prestart :], _job_env(spec)) if spec.prestart else None
            return await box.run(spec, sink, job)
        except (SandboxError, OSError, ValueError) as exc:
            return RunOutcome(exit_code=None, error=f"sandbox setup failed: {exc}")
        finally:
            await self._release_box(box)

    def _give_to_sandbox_user(self, workdir: Path) -> None:
        chown_tree(workdir, self._uid, self._uid)

    async def _launch(self, box: Box, spec: RunSpec) -> None:
        assert self._launcher is not None
        tmp = self._workspaces.tmp_for(spec.workdir)
        await self._launcher.start(spec, box, tmp if tmp.is_dir() else None)

    async def _adjust(self, box: Box, spec: RunSpec) -> bool:
        """Give a pre-started sandbox the run's cgroup limits (only those that differ)
        and fresh usage counters. False: it died, or cannot take them (a memory limit
        below what it already uses)."""
        if not box.alive():
            return False
        try:
            if box.slot is not None:
                box.slot.configure(spec.limits)
            box.wake()
        except OSError:
            return False
        return True

    async def _release_box(self, box: Box) -> None:
        # What is left once every process of the run is gone is waited for in the
        # background (and by ``close``), so that the run's answer does not wait for it:
        # a run's NAT (network on) takes ~20 ms to exit once let go (its network
        # namespace went with the run's processes), and a zygote's fork reports its end
        # before its processes have exited (``Box.end_reported``).
        network, box.network = box.network, None
        if network is not None:
            network.release()
        if box.end_reported():
            spawn(self._ending, self._cleanup(box))
        else:
            await self._cleanup(box)
        if network is not None:
            spawn(self._ending, network.close())

    async def _cleanup(self, box: Box) -> None:
        with anyio.CancelScope(shield=True):
            await box.cleanup(self._cgroups)
        self._live.discard(box)

    # --- the pool's factory --------------------------------------------------------

    def _forking(self, key: PoolKey) -> Zygotes | None:
        """The zygotes, when sandboxes of ``key`` are forks of one (else bwrap starts them)."""
        zygotes = self._zygotes
        if zygotes is not None and zygotes.serves(key) and not zygotes.broken(key):
            return zygotes
        return None

    def pool_size(self, key: PoolKey) -> int:
        forked = self._forking(key) is not None
        return self.settings.pool_zygote_size if forked else self.settings.pool_size

    async def make(self, key: PoolKey, template: RunSpec) -> Entry | None:
        """A sandbox for ``key`` started up to its job, in a workspace of its own: forked
        from the key's zygote where one serves it (``zygote.py``), else by bwrap."""
        assert self._launcher is not None
        name = f"{POOL_PREFIX}{self._instance}-{next(self._names)}"
        zygotes = self._forking(key)
        if zygotes is not None:
            spec = self._warming(template, name, Path(SANDBOX_WORKDIR))
            made = await zygotes.sandbox(key, spec)
            if made is not None:
                return Entry(key, *made)
            if not zygotes.broken(key):
                return None
        workdir = await anyio.to_thread.run_sync(self._workspaces.create, name, key.disk_mb)
        box = Box()
        spec = self._warming(template, name, workdir)
        try:
            await self._launcher.start(spec, box, self._workspaces.tmp_for(workdir), ahead=True)
        except BaseException:
            await self.destroy(Entry(key, box, workdir))
            raise
        if not box.released:
            log.warning("a pooled sandbox did not start", bwrap_said=box.stderr_head())
            await self.destroy(Entry(key, box, workdir))
            return None
        return Entry(key, box, workdir)

    def _warming(self, template: RunSpec, name: str, workdir: Path) -> RunSpec:
        limits = template.limits
        if self._cgroups is not None:  # memory is adjusted at hand-off: start with the default
            limits = dataclasses.replace(
                limits, memory_mb=self.settings.default_memory_mb, pids=self.settings.default_pids
            )
        return dataclasses.replace(
            template, execution_id=name, workdir=workdir, limits=limits, stdin=None
        )

    async def destroy(self, entry: Entry) -> None:
        await self._release_box(entry.box)
        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(self._workspaces.remove, entry.workdir)


def _copy_tree(source: Path, target: Path) -> None:
    shutil.copytree(source, target, symlinks=True, dirs_exist_ok=True)


def _job_env(spec: RunSpec) -> dict[str, str]:
    # bwrap --chdir sets PWD in what it starts; a program started ahead of its job has
    # it from there, and the job's environment keeps it, as a command started cold has.
    return {**spec.env, "PWD": SANDBOX_WORKDIR}
