"""Requirement environments: installed once per key, then reused read-only by every run.

An environment is a directory ``<envs_path>/<key>/`` whose ``site-packages/``
is a ``uv pip install --target`` tree for one interpreter (console scripts in
``site-packages/bin``, bytecode precompiled). The key hashes the interpreter
version and binary, the normalized requirements and the index options. Runs
get ``site-packages`` mounted read-only at its host path and put on
``sys.path`` (``mounts``/``sys_path_entries``).

Building is atomic (install into ``.staging-*``, then ``rename``) and happens
once per key: an anyio lock per key in the process, an ``flock`` on
``.locks/<key>.lock`` across processes. Disk is bounded by
``settings.envs_max_mb``: least-recently-used environments (``.last-used``
mtime) are removed, but never one used within ``settings.max_timeout`` seconds
(a run may still have it mounted), so the bound is exceeded rather than a
running program broken.

Usage::

    cache = EnvironmentCache(settings, backend)
    env = await cache.ensure(interpreter, ("six==1.17.0",))
    mounts = cache.mounts(env)                  # read-only, target == sys.path entry
"""

from __future__ import annotations

import fcntl
import json
import os
import secrets
import shutil
import tempfile
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import anyio

from ..errors import InstallError
from ..logs import get_logger
from ..sandbox.base import Interpreter, Mount, SandboxBackend
from ..settings import Settings
from . import envfiles
from .autodetect import requirements_for_run
from .installer import (
    Installer,
    InstallJob,
    InstallResult,
    SandboxInstaller,
    index_options,
    install_argv,
    install_env,
    make_installer,
    uv_binary,
)
from .jobs import Job
from .requirements import environment_key, normalize_requirement

SITE_PACKAGES = "site-packages"
META = "env.json"  # written last before the rename: its presence means "complete"
LAST_USED = ".last-used"
_LOCKS = ".locks"
_STAGING = ".staging-"
_TRASH = ".trash-"
_FAILURE_TTL = 60.0  # a failed key answers with its error this long without reinstalling
_MESSAGE_TAIL = 3000
_MIB = 1024 * 1024

log = get_logger(__name__)


@dataclass
class _KeyLock:
    lock: anyio.Lock = field(default_factory=anyio.Lock)
    users: int = 0


class EnvironmentCache:
    """Builds, reuses and evicts environments. ``installs`` counts installer runs."""

    def __init__(
        self, settings: Settings, backend: SandboxBackend, *, installer: Installer | None = None
    ) -> None:
        self.settings = settings
        self.root = settings.envs_path
        self.installer = installer or make_installer(settings, backend)
        self.options = index_options(settings)
        self.installs = 0
        self._uv = uv_binary()
        self._salt = f"{self.options.fingerprint()}|wheels_only={settings.wheels_only}"
        self._owner = _sandbox_owner(settings, self.installer)
        self._locks: dict[str, _KeyLock] = {}
        self._failures: dict[str, tuple[float, str]] = {}

    # --- public -------------------------------------------------------------

    async def prepare(self, job: Job, interpreter: Interpreter) -> tuple[Mount, ...]:
        """The runner's hook: mounts for the job's requirements (explicit + detected).

        Detected imports never fail a run: if installing them fails, only the
        explicit requirements are installed and the program meets its own
        ``ModuleNotFoundError``.
        """
        explicit = requirements_for_run(
            job.requirements_txt, {}, python_version=interpreter.version, auto_detect=False
        )
        wanted = requirements_for_run(
            job.requirements_txt,
            dict(job.files),
            python_version=interpreter.version,
            auto_detect=job.auto_detect,
        )
        if not wanted:
            return ()
        try:
            return self.mounts(await self.ensure(interpreter, wanted))
        except InstallError as exc:
            if wanted == explicit:
                raise
            log.info("detected imports not installable", requirements=wanted, error=exc.message)
        return self.mounts(await self.ensure(interpreter, explicit)) if explicit else ()

    async def ensure(self, interpreter: Interpreter, requirements: Sequence[str]) -> Path:
        """The host path of the environment for ``requirements``, installing it if needed.

        Raises ``InstallError`` (naming the packages, with the installer's output).
        """
        wanted = tuple(sorted({normalize_requirement(r) for r in requirements}))
        if not wanted:
            raise ValueError("ensure() needs at least one requirement")
        key = self.key(interpreter, wanted)
        if not self._use_if_ready(key):
            async with self._key_lock(key):
                if not self._use_if_ready(key):
                    self._raise_recent_failure(key)
                    await self._build(key, interpreter, wanted)
        return self.root / key

    def key(self, interpreter: Interpreter, requirements: Sequence[str]) -> str:
        salt = f"{interpreter.executable}|{self._salt}"
        return environment_key(interpreter.version, requirements, salt=salt)

    def sys_path_entries(self, env: Path) -> tuple[str, ...]:
        """What to prepend to ``sys.path`` in the sandbox (mounted at the same path)."""
        return (str(env / SITE_PACKAGES),)

    def path_entries(self, env: Path) -> tuple[str, ...]:
        """Console scripts of the environment, for ``PATH`` (they need ``PYTHONPATH`` set
        to ``sys_path_entries`` too: they do not run with ``-I``)."""
        return (str(env / SITE_PACKAGES / "bin"),)

    def mounts(self, env: Path) -> tuple[Mount, ...]:
        """Read-only mounts whose targets are exactly ``sys_path_entries(env)``."""
        return tuple(Mount(Path(entry), entry) for entry in self.sys_path_entries(env))

    def evict(self, keep: str | None = None) -> list[str]:
        """Remove least-recently-used environments until the total fits ``envs_max_mb``.
        Blocking: run in a thread. Returns the removed keys."""
        self._sweep_leftovers()
        inventory = sorted(self._inventory())
        total = sum(size for _, size, _ in inventory)
        budget = self.settings.envs_max_mb * _MIB
        recent = time.time() - self.settings.max_timeout
        removed: list[str] = []
        for last_used, size, key in inventory:
            if total <= budget:
                break
            if key != keep and last_used < recent and self._remove(key):
                total -= size
                removed.append(key)
        if total > budget:
            log.warning("environments over budget", mb=total // _MIB, max_mb=budget // _MIB)
        return removed

    # --- building -----------------------------------------------------------

    async def _build(self, key: str, interpreter: Interpreter, wanted: tuple[str, ...]) -> None:
        await anyio.to_thread.run_sync(self._make_dirs)
        fd = await envfiles.flock(self._lock_path(key), fcntl.LOCK_EX)
        try:
            if self._ready(key):  # another process built it meanwhile
                envfiles.touch(self.root / key / LAST_USED)
                return
            await self._install(key, interpreter, wanted)
        finally:
            os.close(fd)
        await anyio.to_thread.run_sync(self.evict, key)

    async def _install(self, key: str, interpreter: Interpreter, wanted: tuple[str, ...]) -> None:
        staging = await anyio.to_thread.run_sync(self._new_staging, key)
        try:
            self.installs += 1
            result = await self.installer.install(self._job(key, interpreter, wanted, staging))
            if not result.ok:
                message = failure_message(wanted, result, self.settings.install_timeout)
                self._remember_failure(key, message)
                raise InstallError(message)
            await anyio.to_thread.run_sync(self._commit, staging, key, interpreter, wanted)
        finally:
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(partial(shutil.rmtree, staging, ignore_errors=True))

    def _job(
        self, key: str, interpreter: Interpreter, wanted: tuple[str, ...], staging: Path
    ) -> InstallJob:
        argv = install_argv(
            self.settings,
            self.options,
            uv=self._uv,
            interpreter=interpreter,
            target=staging / SITE_PACKAGES,
            requirements=wanted,
        )
        return InstallJob(
            key=key,
            argv=argv,
            env=install_env(self.options, staging / "home"),
            interpreter=interpreter,
            writable=(staging, self.settings.uv_cache_path),
            readable=(self._uv, *self.options.readable),
            timeout=float(self.settings.install_timeout),
        )

    def _make_dirs(self) -> None:
        if envfiles.make_dir(self.root):
            self.root.chmod(0o755)  # the sandbox uid reaches environments through it
        envfiles.make_dir(self.root / _LOCKS)
        cache = self.settings.uv_cache_path
        if envfiles.make_dir(cache):
            cache.chmod(0o700)
            self._chown(cache)  # a sandboxed installer writes it

    def _new_staging(self, key: str) -> Path:
        staging = Path(tempfile.mkdtemp(prefix=f"{_STAGING}{key[:16]}-", dir=self.root))
        staging.chmod(0o755)
        for path in (staging, staging / SITE_PACKAGES, staging / "home"):
            path.mkdir(exist_ok=True)
            self._chown(path)
        return staging

    def _commit(
        self, staging: Path, key: str, interpreter: Interpreter, wanted: tuple[str, ...]
    ) -> None:
        (staging / SITE_PACKAGES / ".lock").unlink(missing_ok=True)  # uv's, not ours
        shutil.rmtree(staging / "home", ignore_errors=True)
        meta = {
            "key": key,
            "python": interpreter.version,
            "interpreter": str(interpreter.executable),
            "requirements": list(wanted),
            "size_bytes": envfiles.disk_usage(staging),
            "created": time.time(),
        }
        (staging / META).write_text(json.dumps(meta, indent=2))
        envfiles.touch(staging / LAST_USED)
        envfiles.publish_tree(staging, chown=self._owner is not None)
        staging.rename(self.root / key)

    def _chown(self, path: Path) -> None:
        if self._owner is not None:
            os.chown(path, self._owner, self._owner)

    # --- reuse, locks, failures ---------------------------------------------

    def _ready(self, key: str) -> bool:
        return (self.root / key / META).is_file()

    def _use_if_ready(self, key: str) -> bool:
        """Mark a complete environment used, under a shared lock so that eviction (which
        takes it exclusively) cannot remove it between the check and the touch."""
        if not self._ready(key):
            return False
        fd = envfiles.try_flock(self._lock_path(key), fcntl.LOCK_SH)
        if fd is None:
            return False
        try:
            if not self._ready(key):
                return False
            envfiles.touch(self.root / key / LAST_USED)
            return True
        finally:
            os.close(fd)

    def _remember_failure(self, key: str, message: str) -> None:
        now = time.monotonic()
        self._failures = {k: v for k, v in self._failures.items() if now - v[0] < _FAILURE_TTL}
        self._failures[key] = (now, message)

    def _raise_recent_failure(self, key: str) -> None:
        failed = self._failures.get(key)
        if failed is None:
            return
        if time.monotonic() - failed[0] < _FAILURE_TTL:
            raise InstallError(failed[1])
        del self._failures[key]

    @asynccontextmanager
    async def _key_lock(self, key: str) -> AsyncIterator[None]:
        entry = self._locks.setdefault(key, _KeyLock())
        entry.users += 1
        try:
            async with entry.lock:
                yield
        finally:
            entry.users -= 1
            if entry.users == 0:
                del self._locks[key]

    def _lock_path(self, key: str) -> Path:
        return self.root / _LOCKS / f"{key}.lock"

    # --- eviction -----------------------------------------------------------

    def _inventory(self) -> list[tuple[float, int, str]]:
        """(last used, size, key) of every complete environment."""
        found: list[tuple[float, int, str]] = []
        for entry in envfiles.listdir(self.root):
            if entry.name.startswith("."):
                continue
            try:
                size = int(json.loads((entry / META).read_text())["size_bytes"])
                found.append(((entry / LAST_USED).stat().st_mtime, size, entry.name))
            except (OSError, ValueError, KeyError, TypeError):
                continue  # being removed, or not ours
        return found

    def _remove(self, key: str) -> bool:
        lock = self._lock_path(key)
        fd = envfiles.try_flock(lock, fcntl.LOCK_EX)
        if fd is None:
            return False  # in use right now
        try:
            trash = self.root / f"{_TRASH}{key[:16]}-{secrets.token_hex(4)}"
            (self.root / key).rename(trash)
            lock.unlink(missing_ok=True)
        finally:
            os.close(fd)
        shutil.rmtree(trash, ignore_errors=True)
        return True

    def _sweep_leftovers(self) -> None:
        """Staging dirs of crashed installs, trash of crashed evictions, orphan lock files."""
        stale = time.time() - self.settings.install_timeout - 60
        for entry in envfiles.listdir(self.root):
            leftover = entry.name.startswith(_TRASH) or entry.name.startswith(_STAGING)
            if leftover and envfiles.mtime(entry) < stale:
                shutil.rmtree(entry, ignore_errors=True)
        for lock in envfiles.listdir(self.root / _LOCKS):
            if not (self.root / lock.stem).exists():
                fd = envfiles.try_flock(lock, fcntl.LOCK_EX)
                if fd is not None:
                    lock.unlink(missing_ok=True)
                    os.close(fd)


def failure_message(wanted: Sequence[str], result: InstallResult, timeout: int) -> str:
    names = ", ".join(wanted)
    if result.timed_out:
        return f"installing requirements ({names}) timed out after {timeout} s"
    lines = [line for line in result.output.splitlines() if not line.startswith("Using CPython")]
    detail = result.error or "\n".join(lines).strip()[-_MESSAGE_TAIL:] or "no output"
    return f"could not install requirements ({names}): {detail}"


def _sandbox_owner(settings: Settings, installer: Installer) -> int | None:
    """The uid that must own what a sandboxed installer writes (when we can chown)."""
    if isinstance(installer, SandboxInstaller) and os.geteuid() == 0:
        return settings.sandbox_host_uid
    return None
