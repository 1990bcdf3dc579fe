"""Running ``uv pip install --target``: the command line, the index options, the seam.

``Installer`` is the seam between the environment cache and whatever runs the
installer. ``SandboxInstaller`` runs it through the sandbox backend (its own
sandbox, network on, only the target and the uv cache writable);
``HostInstaller`` runs it as a plain host process, for trusted setups and for
backends that cannot run it (pair it with ``wheels_only``: building an sdist
runs the package's own code). ``make_installer`` picks one from
``settings.install_isolation``.

Package sources come from the settings (``index_url``, ``extra_index_url``;
uv's first-index strategy, which defeats dependency confusion); when neither is
set, from the host's pip configuration files, which uv does not read itself:
``index-url``, ``extra-index-url``, ``find-links``, ``no-index`` and
``constraint``, with pip's "best version across all sources" semantics.
pip.conf's ``cert`` (a TLS trust store, e.g. for an intercepting proxy)
becomes ``SSL_CERT_FILE`` either way. ``PIP_*`` environment variables are not
read (``settings.py`` is the only reader of the environment).

Usage::

    installer = make_installer(settings, backend)
    result = await installer.install(job)     # InstallResult(exit_code=0, output="...")
"""

from __future__ import annotations

import configparser
import contextlib
import hashlib
import itertools
import os
import signal
import subprocess
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol
from urllib.parse import unquote, urlparse

import anyio
from anyio.abc import Process

from ..sandbox.base import CollectedOutput, Interpreter, Limits, Mount, RunSpec, SandboxBackend
from ..settings import Settings

OUTPUT_CAP = 64 * 1024  # installer output kept (the tail: errors come last)
INSTALL_PIDS = 512  # uv runs many threads; every thread counts against the pids limit
_PATH = "/usr/local/bin:/usr/bin:/bin"


def pip_config_files() -> tuple[Path, ...]:
    """pip's global and user files, lowest precedence first (a venv's site file is not ours)."""
    home = Path("~").expanduser()
    return (
        Path("/etc/xdg/pip/pip.conf"),
        Path("/etc/pip.conf"),
        home / ".pip" / "pip.conf",
        home / ".config" / "pip" / "pip.conf",
    )


@dataclass(frozen=True)
class IndexOptions:
    """uv arguments that choose where packages come from, and what they need to read."""

    args: tuple[str, ...] = ()
    env: Mapping[str, str] = field(default_factory=dict)
    readable: tuple[Path, ...] = ()  # local indexes, find-links dirs, cert, constraint files

    def fingerprint(self) -> str:
        """Changes when the resolution could change (not with the cert)."""
        digest = hashlib.sha256("\0".join(self.args).encode())
        for flag, value in itertools.pairwise(self.args):
            if flag == "--constraint":
                digest.update(Path(value).read_bytes())
        return digest.hexdigest()[:16]


@dataclass(frozen=True)
class InstallJob:
    """One installer run. ``writable`` is all it may write; ``readable`` all else it may see
    besides the interpreter's prefix and the system."""

    key: str
    argv: tuple[str, ...]
    env: Mapping[str, str]
    interpreter: Interpreter
    writable: tuple[Path, ...]
    readable: tuple[Path, ...]
    timeout: float


@dataclass(frozen=True)
class InstallResult:
    exit_code: int | None
    output: str
    timed_out: bool = False
    error: str | None = None  # the installer could not be started at all

    @property
    def ok(self) -> bool:
        return self.exit_code == 0 and not self.timed_out and self.error is None


class Installer(Protocol):
    async def install(self, job: InstallJob) -> InstallResult:
        """Run ``job.argv`` to its end or ``job.timeout``; never raise for a failed install."""


def uv_binary() -> Path:
    """The uv executable shipped with the ``uv`` package (a server dependency)."""
    from uv import find_uv_bin

    return Path(find_uv_bin()).resolve()


def install_argv(
    settings: Settings,
    options: IndexOptions,
    *,
    uv: Path,
    interpreter: Interpreter,
    target: Path,
    requirements: Sequence[str],
) -> tuple[str, ...]:
    """``uv pip install --target`` for ``interpreter``, copying (never hard-linking) from the
    shared cache and compiling bytecode (the environment is mounted read-only later)."""
    argv = [str(uv), "pip", "install", "--no-config", "--no-progress", "--color", "never"]
    # On Docker the install runs in the image, whose interpreter is ``python3`` on PATH.
    python = "python3" if settings.sandbox == "docker" else str(interpreter.executable)
    argv += ["--no-python-downloads", "--python", python]
    argv += ["--target", str(target), "--cache-dir", str(settings.uv_cache_path)]
    argv += ["--link-mode", "copy", "--compile-bytecode", *options.args]
    if settings.wheels_only:
        argv += ["--only-binary", ":all:"]
    if settings.offline_installs:
        argv.append("--offline")
    return (*argv, "--", *requirements)


def install_env(options: IndexOptions, home: Path) -> dict[str, str]:
    return {"PATH": _PATH, "HOME": str(home), "LANG": "C.UTF-8", **options.env}


def index_options(settings: Settings, pip_files: Iterable[Path] | None = None) -> IndexOptions:
    """Where packages come from: the settings' indexes, else (``respect_pip_config``) pip.conf's.
    pip.conf's ``cert`` (TLS trust, not a package source) applies in both cases."""
    files = pip_config_files() if pip_files is None else pip_files
    pip = read_pip_config(files) if settings.respect_pip_config else {}
    if settings.index_url or settings.extra_index_url:
        sources = _settings_sources(settings)
    else:
        sources = pip_index_options(pip)
    cert = pip.get("cert")
    if not cert or not Path(cert).is_file():
        return sources
    env = {**sources.env, "SSL_CERT_FILE": cert}
    return IndexOptions(sources.args, env, (*sources.readable, Path(cert)))


def _settings_sources(settings: Settings) -> IndexOptions:
    """Settings' indexes, with uv's default first-index strategy (no dependency confusion)."""
    args: list[str] = []
    if settings.index_url:
        args += ["--index-url", settings.index_url]
    for url in (settings.extra_index_url or "").split():
        args += ["--extra-index-url", url]
    return IndexOptions(
        tuple(args), readable=_local_paths(settings.index_url, settings.extra_index_url)
    )


def read_pip_config(files: Iterable[Path]) -> dict[str, str]:
    """pip's merged configuration: later files win, ``[install]`` wins over ``[global]``."""
    merged: dict[str, str] = {}
    for path in files:
        parser = configparser.RawConfigParser()
        try:
            parser.read(path, encoding="utf-8")
        except (OSError, configparser.Error):
            continue
        for section in ("global", "install"):
            if parser.has_section(section):
                merged.update({k.replace("_", "-"): v for k, v in parser.items(section)})
    return merged


def pip_index_options(config: Mapping[str, str]) -> IndexOptions:
    """Translate pip's package-source options to uv's. Local paths that do not exist are
    dropped (pip warns and ignores them; uv would fail)."""
    args: list[str] = []
    readable: list[Path] = []
    if config.get("no-index", "").lower() in ("1", "true", "yes", "on"):
        args.append("--no-index")
    for flag, key in (("--index-url", "index-url"), ("--extra-index-url", "extra-index-url")):
        for url in config.get(key, "").split():
            if _usable(url, readable):
                args += [flag, url]
    for location in config.get("find-links", "").split():
        if _usable(location, readable):
            args += ["--find-links", location]
    for constraint in config.get("constraint", "").split():
        if Path(constraint).is_file():
            args += ["--constraint", constraint]
            readable.append(Path(constraint))
    if "--extra-index-url" in args or "--find-links" in args:
        args += ["--index-strategy", "unsafe-best-match"]  # pip's: best version of all sources
    return IndexOptions(tuple(args), readable=tuple(readable))


def _usable(location: str, readable: list[Path]) -> bool:
    """A remote URL, or an existing local path (what the installer must read of it is
    added to ``readable``)."""
    local = _local_path(location)
    if local is None:
        return True
    if not local.exists():
        return False
    readable.append(_index_root(local))
    return True


def _index_root(path: Path) -> Path:
    """A local PEP 503 index ``<root>/simple`` links to files elsewhere under ``<root>``."""
    return path.parent if path.name == "simple" and path.is_dir() else path


def _local_path(location: str) -> Path | None:
    parsed = urlparse(location)
    if parsed.scheme == "file":
        return Path(unquote(parsed.path))
    if not parsed.scheme:
        return Path(location)
    return None


def _local_paths(*locations: str | None) -> tuple[Path, ...]:
    found = [_local_path(url) for value in locations for url in (value or "").split()]
    return tuple(_index_root(path) for path in found if path is not None and path.exists())


class HostInstaller:
    """Runs the installer as a plain process of the server (no isolation but a new session)."""

    async def install(self, job: InstallJob) -> InstallResult:
        try:
            process = await anyio.open_process(
                job.argv,
                env=dict(job.env),
                cwd=job.env.get("HOME"),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                umask=0o022,
            )
        except OSError as exc:
            return InstallResult(None, "", error=f"could not start the installer: {exc}")
        return await _collect(process, job.timeout)


async def _collect(process: Process, time_limit: float) -> InstallResult:
    tail = bytearray()
    exit_code: int | None = None
    timed_out = False
    try:
        with anyio.fail_after(time_limit):
            assert process.stdout is not None
            async for chunk in process.stdout:
                tail += chunk
                del tail[:-OUTPUT_CAP]
            exit_code = await process.wait()
    except TimeoutError:
        timed_out = True
    finally:
        _kill_group(process.pid)
        with anyio.CancelScope(shield=True):
            await process.aclose()
    return InstallResult(exit_code, tail.decode("utf-8", "replace"), timed_out)


def _kill_group(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)


class SandboxInstaller:
    """Runs the installer in its own sandbox of ``backend``: network on, the target and the
    uv cache mounted writable at their host paths, ``readable`` read-only, nothing else of
    the host but what every sandbox sees (the system, the interpreter's prefix)."""

    def __init__(self, settings: Settings, backend: SandboxBackend) -> None:
        self.settings = settings
        self.backend = backend

    async def install(self, job: InstallJob) -> InstallResult:
        execution_id = f"install_{job.key[:16]}"
        workspace = await self.backend.create_workspace(execution_id, self.settings.default_disk_mb)
        try:
            sink = CollectedOutput(cap=OUTPUT_CAP)
            outcome = await self.backend.run(self._spec(job, execution_id, workspace), sink)
        finally:
            with anyio.CancelScope(shield=True):
                await self.backend.remove_workspace(workspace)
        output = sink.text("stdout") + sink.text("stderr")
        return InstallResult(outcome.exit_code, output, outcome.timed_out, outcome.error)

    def _spec(self, job: InstallJob, execution_id: str, workspace: Path) -> RunSpec:
        mounts = [Mount(p, str(p), writable=True) for p in job.writable]
        mounts += [Mount(p, str(p)) for p in job.readable]
        return RunSpec(
            execution_id=execution_id,
            workdir=workspace,
            interpreter=job.interpreter,
            argv=job.argv,
            env={**job.env, "HOME": "/work"},
            limits=Limits(
                timeout_seconds=job.timeout,
                memory_mb=self.settings.install_memory_mb,
                disk_mb=self.settings.default_disk_mb,
                cpu_shares=self.settings.default_cpu_shares,
                pids=max(self.settings.default_pids, INSTALL_PIDS),
                network=True,
                output_cap_bytes=OUTPUT_CAP,
            ),
            mounts=tuple(mounts),
        )


def make_installer(settings: Settings, backend: SandboxBackend) -> Installer:
    if settings.install_isolation == "host":
        return HostInstaller()
    return SandboxInstaller(settings, backend)
