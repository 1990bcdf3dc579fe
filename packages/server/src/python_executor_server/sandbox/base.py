"""The sandbox seam: what one run needs, what it gives back.

A ``SandboxBackend`` runs one command in an isolated environment and streams
its output into an ``OutputSink``. The runner (``execution/runner.py``)
prepares everything host-side (work dir, interpreter, environment) and hands
over a frozen ``RunSpec``; the backend owns isolation and limits.

Cancellation is the kill mechanism: when the task awaiting ``run`` is
cancelled (DELETE, shutdown), the backend must kill every process of the run
before the cancellation propagates. The timeout is enforced by the backend
itself and reported as ``RunOutcome.timed_out``.

Usage::

    outcome = await backend.run(spec, sink)
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

# Where things appear inside every sandbox, whatever the backend.
SANDBOX_WORKDIR = "/work"
SANDBOX_TMPDIR = "/tmp"
SANDBOX_UID = 1000
SANDBOX_GID = 1000


@dataclass(frozen=True)
class Interpreter:
    """One Python the server can run user code with."""

    version: str  # "3.12"
    executable: Path  # host path of the binary
    prefix: Path  # sys.base_prefix: bound read-only into the sandbox at the same path


@dataclass(frozen=True)
class Limits:
    timeout_seconds: float
    memory_mb: int
    disk_mb: int
    cpu_shares: int
    pids: int
    network: bool  # True: the run may use the network (its own namespace, NAT)
    output_cap_bytes: int  # per stream
    open_files: int = 1024
    file_size_mb: int | None = None  # largest single file; None: disk_mb


@dataclass(frozen=True)
class Mount:
    """A host path made visible inside the sandbox."""

    source: Path
    target: str
    writable: bool = False


@dataclass(frozen=True)
class RunSpec:
    execution_id: str
    workdir: Path  # host directory with the project; appears at /work, writable, private
    interpreter: Interpreter
    argv: tuple[str, ...]  # command line inside the sandbox; argv[0] is an absolute path
    env: Mapping[str, str]  # the whole environment of the command
    limits: Limits
    stdin: bytes | None = None
    mounts: tuple[Mount, ...] = ()  # extra read-only mounts (requirement environments)
    result_fd: int | None = (
        None  # if set: an extra pipe at this fd inside; bytes -> RunOutcome.side_channel
    )
    image: str | None = None  # Docker backend only


@dataclass(frozen=True)
class RunOutcome:
    exit_code: int | None  # None when the process never reported one (killed)
    timed_out: bool = False
    oom_killed: bool = False
    side_channel: bytes = b""  # what the program wrote to ``result_fd``
    cpu_ms: int | None = None
    peak_memory_mb: float | None = None
    error: str | None = None  # the backend could not run it at all (setup failure)


class OutputSink(Protocol):
    """Receives output as it is produced. Caps and fan-out live behind it."""

    def write(self, stream: str, data: bytes) -> None:
        """``stream`` is "stdout" or "stderr". Must not block."""


class SandboxBackend(Protocol):
    name: str

    async def start(self) -> None:
        """Prepare (reap orphans of an earlier crash, compile filters, warm pools)."""

    async def close(self) -> None:
        """Stop every run and release what ``start`` made."""

    def describe(self) -> dict[str, Any]:
        """What enforcement is active, for ``/health`` (cgroup version, seccomp, ...)."""

    async def create_workspace(self, execution_id: str, disk_mb: int) -> Path:
        """An empty host directory for the project of one run, owned by the sandbox
        user, whose size the backend caps at ``disk_mb`` where it can (tmpfs)."""

    async def remove_workspace(self, path: Path) -> None:
        """Undo ``create_workspace`` (unmount, delete). Idempotent."""

    async def run(self, spec: RunSpec, sink: OutputSink) -> RunOutcome:
        """Run ``spec`` to its end, its timeout, or the caller's cancellation."""


@dataclass
class CollectedOutput:
    """A simple sink keeping everything up to a cap (tests, install steps)."""

    cap: int = 8 * 1024 * 1024
    chunks: dict[str, bytearray] = field(
        default_factory=lambda: {"stdout": bytearray(), "stderr": bytearray()}
    )

    def write(self, stream: str, data: bytes) -> None:
        buf = self.chunks[stream]
        room = self.cap - len(buf)
        if room > 0:
            buf += data[:room]

    def text(self, stream: str) -> str:
        return self.chunks[stream].decode("utf-8", "replace")
