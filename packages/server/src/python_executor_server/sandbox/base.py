"""The sandbox seam: what one run needs, what it gives back.

A ``SandboxBackend`` runs one command in an isolated environment and streams
its output into an ``OutputSink``. The runner (``execution/runner.py``)
prepares everything host-side (work dir, interpreter, environment) and hands
over a frozen ``RunSpec``; the backend owns isolation and limits.

A backend may keep sandboxes started ahead of time (bwrap's pool): for that the
runner passes the run it is about to make to ``create_workspace``, so the workspace
handed out can be that of a pre-started sandbox fitting the run, and marks the
command's launch prefix (``RunSpec.prestart``). A pre-startable program, given
``--job-fd N``, writes one byte to the stream socket N (ready), then reads its
job (``encode_job``: the rest of the command line and the environment) and
closes N before doing anything else; the cold path speaks the same protocol
with the job sent at once, so both look the same from inside.

Cancellation is the kill mechanism: when the task awaiting ``run`` is
cancelled (DELETE, shutdown), the backend must kill every process of the run
before the cancellation propagates. The timeout is enforced by the backend
itself and reported as ``RunOutcome.timed_out``.

Usage::

    work = await backend.create_workspace(spec.execution_id, spec.limits.disk_mb, spec)
    ...                                  # the project goes into work
    outcome = await backend.run(dataclasses.replace(spec, workdir=work), sink)
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

# Where things appear inside every sandbox, whatever the backend.
SANDBOX_WORKDIR = "/work"
SANDBOX_TMPDIR = "/tmp"
SANDBOX_UID = 1000
SANDBOX_GID = 1000
JOB_FD_OPTION = "--job-fd"  # what a pre-startable program is started with (see above)


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
    # argv[:prestart] is a pre-startable program (see the module doc) that takes
    # argv[prestart:] and env as its job; 0: argv is started as it is.
    prestart: int = 0


@dataclass(frozen=True)
class RunOutcome:
    # 128 + N after death by signal N; None when we killed it (timeout, cancel)
    exit_code: int | None
    timed_out: bool = False
    oom_killed: bool = False
    side_channel: bytes = b""  # what the program wrote to ``result_fd``
    cpu_ms: int | None = None
    peak_memory_mb: float | None = None
    error: str | None = None  # the backend could not run it at all (setup failure)


_END_LINE = re.compile(rb"\nexit (\d{1,3})\n\Z")


def end_code(side_channel: bytes) -> int | None:
    """The exit code a program said it ends with, as the last line of its side channel
    (``exit N``, N in 0-255), once it closed every copy of its stdout, stderr and side
    channel (the caller checks that: each reached EOF). A backend may then end the run
    without waiting for the program's exit (the eval driver says it, ``_sandbox_main``).
    A program can say a false code or say it early: it only ends its own run sooner."""
    found = _END_LINE.search(side_channel[-16:])
    if found is None:
        return None
    code = int(found.group(1))
    return code if code < 256 else None


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

    async def create_workspace(
        self, execution_id: str, disk_mb: int, spec: RunSpec | None = None
    ) -> Path:
        """An empty host directory for the project of one run, owned by the sandbox
        user, whose size the backend caps at ``disk_mb`` where it can (tmpfs).

        ``spec``: the run it is for (its ``workdir`` is not read). A backend with
        pre-started sandboxes may return the workspace of one that can run it; ``run``
        of a spec with that workdir then hands the run to that sandbox."""

    async def remove_workspace(self, path: Path) -> None:
        """Undo ``create_workspace`` (unmount, delete). Idempotent."""

    async def run(self, spec: RunSpec, sink: OutputSink) -> RunOutcome:
        """Run ``spec`` to its end, its timeout, or the caller's cancellation."""

    def warm(self, spec: RunSpec) -> None:
        """Start sandboxes for runs like ``spec`` ahead of them, in the background, where
        the backend keeps any (its ``workdir`` is not read). Never waits, never fails."""


def encode_job(args: Sequence[str], env: Mapping[str, str]) -> bytes:
    """A pre-started program's job: a decimal length and a newline, then that many bytes
    of NUL-separated fields: the number of arguments, the arguments, ``KEY=VALUE``."""
    fields = [str(len(args)), *args, *(f"{key}={value}" for key, value in env.items())]
    if any("\0" in field for field in fields):
        raise ValueError("an argument or environment variable contains a NUL byte")
    body = "\0".join(fields).encode("utf-8", "surrogateescape")
    return b"%d\n%s" % (len(body), body)


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
