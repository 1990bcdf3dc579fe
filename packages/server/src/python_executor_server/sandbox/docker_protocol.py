"""Sans-I/O side of the Docker backend's conversation with its in-container waiter.

The server attaches to a container's stdin/stdout before starting it; the
container runs ``docker_waiter.py`` (see its docstring for the frame
format). This module builds the job the server sends and parses what comes
back, with no I/O, so it is tested without a daemon.

Usage::

    command = waiter_command()                      # the container's Cmd
    payload = encode_job(argv, env, result_fd=3, tar_size=n, stdin_size=0, timeout=30)
    parser = ReplyParser(sink, result_cap=1 << 20)
    parser.feed(bytes_from_the_attach_socket)       # calls sink.write as frames arrive
    if parser.exit is not None: ...
"""

from __future__ import annotations

import functools
import json
import re
import struct
import tarfile
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import IO, Any

from .base import SANDBOX_GID, SANDBOX_UID, OutputSink

WAITER_PATH = Path(__file__).with_name("docker_waiter.py")
IMAGE_PYTHON = "python3"  # what a host interpreter path becomes inside the image
SPOOL_BYTES = 4 * 2**20  # projects up to this size are packed in memory
MAX_FRAME = 1 << 20  # the waiter sends at most 64 KiB per frame; anything bigger is a bug
_PYTHON_NAME = re.compile(r"python(3(\.\d+)?)?")
_DOCKER_HEADER = struct.Struct(">BxxxL")  # stream type, payload length
_FRAME_HEADER = struct.Struct(">cI")  # kind, payload length


class ProtocolError(Exception):
    """The container sent something the waiter never sends."""


@functools.cache
def _waiter_source() -> str:
    return WAITER_PATH.read_text()


def waiter_command() -> list[str]:
    """The container command: the image's python3 running the waiter, isolated."""
    return [IMAGE_PYTHON, "-I", "-S", "-c", _waiter_source()]


def image_argv(argv: Sequence[str], host_interpreter: str) -> list[str]:
    """Map a host command line onto the image.

    The rule: ``argv[0]`` that is the run's host interpreter, or whose file
    name is ``python``, ``python3`` or ``python3.X``, becomes the image's
    ``python3`` (found on the image's PATH by the waiter); any other
    ``argv[0]`` (``/bin/sh`` for pre-commands) is used as it is. The
    remaining arguments are never changed.
    """
    head = argv[0]
    if head == host_interpreter or _PYTHON_NAME.fullmatch(PurePosixPath(head).name):
        head = IMAGE_PYTHON
    return [head, *argv[1:]]


def encode_job(
    argv: Sequence[str],
    env: Mapping[str, str],
    *,
    result_fd: int | None,
    tar_size: int,
    stdin_size: int,
    timeout: float,
) -> bytes:
    """The job header; the tar (``tar_size`` bytes) and stdin follow it on the wire."""
    job = {
        "argv": list(argv),
        "env": dict(env),
        "result_fd": result_fd,
        "tar_size": tar_size,
        "stdin_size": stdin_size,
        "timeout": timeout,
    }
    body = json.dumps(job).encode()
    return struct.pack(">I", len(body)) + body


def pack_workspace(workdir: Path) -> tuple[IO[bytes], int]:
    """An uncompressed tar of ``workdir`` (owned by the sandbox user), rewound."""

    def owned(info: tarfile.TarInfo) -> tarfile.TarInfo | None:
        if not (info.isfile() or info.isdir() or info.issym()):
            return None  # devices, fifos: never part of a project
        info.uid, info.gid = SANDBOX_UID, SANDBOX_GID
        info.uname = info.gname = ""
        return info

    spool = tempfile.SpooledTemporaryFile(max_size=SPOOL_BYTES)  # noqa: SIM115 - returned open
    with tarfile.open(fileobj=spool, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for child in sorted(workdir.iterdir()):
            tar.add(child, arcname=child.name, filter=owned)
    size = spool.tell()
    spool.seek(0)
    return spool, size


@dataclass(frozen=True)
class ExitReport:
    """The waiter's last word: the program ended and nothing of it is left."""

    exit_code: int | None
    cpu_ms: int | None
    peak_memory_mb: float | None
    oom_kills: int | None


class _Demux:
    """Docker's attach stream without a TTY: 8-byte headers, stream 1 and 2."""

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[tuple[int, bytes]]:
        self._buf += data
        out: list[tuple[int, bytes]] = []
        while len(self._buf) >= _DOCKER_HEADER.size:
            stream, size = _DOCKER_HEADER.unpack_from(self._buf)
            end = _DOCKER_HEADER.size + size
            if len(self._buf) < end:
                break
            out.append((stream, bytes(self._buf[_DOCKER_HEADER.size : end])))
            del self._buf[:end]
        return out


class ReplyParser:
    """Turns the bytes of an attach socket into sink writes and a final report."""

    def __init__(self, sink: OutputSink, result_cap: int) -> None:
        self._sink = sink
        self._demux = _Demux()
        self._buf = bytearray()
        self._result_cap = result_cap
        self.result = bytearray()
        self.failure: str | None = None
        self.exit: ExitReport | None = None
        self.waiter_stderr = bytearray()  # the waiter's own crash output, if any

    @property
    def done(self) -> bool:
        return self.exit is not None or self.failure is not None

    def feed(self, data: bytes) -> None:
        for stream, chunk in self._demux.feed(data):
            if stream == 1:
                self._buf += chunk
                self._frames()
            elif len(self.waiter_stderr) < 65536:
                self.waiter_stderr += chunk

    def _frames(self) -> None:
        while len(self._buf) >= _FRAME_HEADER.size:
            kind, size = _FRAME_HEADER.unpack_from(self._buf)
            if size > MAX_FRAME:
                raise ProtocolError(f"frame of {size} bytes")
            end = _FRAME_HEADER.size + size
            if len(self._buf) < end:
                return
            self._dispatch(kind, bytes(self._buf[_FRAME_HEADER.size : end]))
            del self._buf[:end]

    def _dispatch(self, kind: bytes, payload: bytes) -> None:
        if kind == b"o":
            self._sink.write("stdout", payload)
        elif kind == b"e":
            self._sink.write("stderr", payload)
        elif kind == b"r":
            self.result += payload[: max(0, self._result_cap - len(self.result))]
        elif kind == b"f":
            self.failure = payload.decode("utf-8", "replace")
        elif kind == b"x":
            self.exit = _exit_report(json.loads(payload))
        else:
            raise ProtocolError(f"unknown frame kind {kind!r}")


def _exit_report(raw: dict[str, Any]) -> ExitReport:
    return ExitReport(
        exit_code=raw.get("exit_code"),
        cpu_ms=raw.get("cpu_ms"),
        peak_memory_mb=raw.get("peak_memory_mb"),
        oom_kills=raw.get("oom_kills"),
    )
