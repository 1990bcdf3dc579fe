"""cgroupfs by hand: control files, the processes in a cgroup, our hierarchies, and
what servers that died left in them (``cgroups.py`` builds the per-run slots on it).

Usage::

    fs.write(slot / "pids.max", "64"); fs.procs(slot); fs.kill_loop(slot)
    v1_mounts(); v2_mount(); reap_stale(tree)
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path

from .instance import stale_instances
from .mounts import mountinfo

V1_CONTROLLERS = ("memory", "pids", "cpu", "cpuacct")
_READ_SIZE = 65536


def write(path: str | Path, value: str) -> None:
    # os-level: a control file is one write, and a text file object costs more than it
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.write(fd, value.encode())
    finally:
        os.close(fd)


def read(path: str | Path) -> str:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        chunks = []
        while chunk := os.read(fd, 65536):
            chunks.append(chunk)
    finally:
        os.close(fd)
    return b"".join(chunks).decode()


def read_int(path: str | Path, reader: Callable[[str | Path], str] = read) -> int | None:
    try:
        return int(reader(path).split()[0])
    except (OSError, ValueError, IndexError):
        return None


def keyed(path: str | Path, key: str, reader: Callable[[str | Path], str] = read) -> int | None:
    """``key value`` files: memory.oom_control, memory.events, cpu.stat."""
    try:
        for line in reader(path).splitlines():
            name, _, value = line.partition(" ")
            if name == key:
                return int(value)
    except (OSError, ValueError):
        return None
    return None


def procs(directory: Path) -> list[int]:
    try:
        return [int(x) for x in read(os.path.join(directory, "cgroup.procs")).split()]
    except OSError:
        return []


class ControlFiles:
    """A slot's control files, each opened the first time it is used and kept open
    until ``close``: a read or a write is then one syscall instead of three (open,
    read or write, close). cgroupfs regenerates a counter's or setting's content for
    every read at offset 0; a write's offset does not matter. Not for cgroup.procs or
    tasks: v1 keeps the pid list an open file read and serves it again for up to a
    second. A file that is missing (no swap accounting) stays missing, without
    another open."""

    def __init__(self) -> None:
        self._fds: dict[tuple[str | Path, int], int | None] = {}

    def read(self, path: str | Path) -> str:
        fd = self._fd(path, os.O_RDONLY)
        chunks, offset = [], 0
        while True:
            chunk = os.pread(fd, _READ_SIZE, offset)
            chunks.append(chunk)
            if len(chunk) < _READ_SIZE:  # (a control file's read is short only at its end)
                return b"".join(chunks).decode()
            offset += len(chunk)

    def write(self, path: str | Path, value: str) -> None:
        os.pwrite(self._fd(path, os.O_WRONLY), value.encode(), 0)

    def _fd(self, path: str | Path, mode: int) -> int:
        key = (path, mode)
        if key in self._fds:
            fd = self._fds[key]
        else:
            try:
                fd = self._fds[key] = os.open(path, mode | os.O_CLOEXEC)
            except FileNotFoundError:
                self._fds[key] = None
                raise
        if fd is None:
            raise FileNotFoundError(errno.ENOENT, "no such control file", str(path))
        return fd

    def close(self) -> None:
        fds, self._fds = self._fds, {}
        for fd in fds.values():
            if fd is not None:
                os.close(fd)


def signal_all(directory: Path, signum: int) -> None:
    for pid in procs(directory):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signum)


def kill_loop(directory: Path, deadline: float = 2.0) -> bool:
    """SIGKILL every process in ``directory`` until it is empty; True when empty."""
    end = time.monotonic() + deadline
    while True:
        if not procs(directory):
            return True
        if time.monotonic() > end:
            return False
        signal_all(directory, signal.SIGKILL)
        time.sleep(0.002)


def rmdir(directory: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.rmdir(directory)


def v1_mounts() -> dict[str, Path]:
    found: dict[str, Path] = {}
    for point, fstype, options in mountinfo():
        if fstype == "cgroup":
            for controller in V1_CONTROLLERS:
                if controller in options:
                    found.setdefault(controller, point)
    return found


def v2_mount() -> Path | None:
    """The unified hierarchy, when it offers memory and pids."""
    for point, fstype, _ in mountinfo():
        if fstype == "cgroup2":
            try:
                controllers = read(point / "cgroup.controllers").split()
            except OSError:
                continue
            if {"memory", "pids"} <= set(controllers):
                return point
    return None


def reap_stale(tree: Path) -> None:
    """Kill and remove ``tree/<pid>-*/<slot>`` cgroups whose server is gone."""
    for instance in stale_instances(tree):
        for slot in instance.iterdir():
            if slot.is_dir():
                kill_loop(slot)
                with contextlib.suppress(OSError):
                    os.rmdir(slot)
        with contextlib.suppress(OSError):
            os.rmdir(instance)


class Written:
    """Control-file values this slot last wrote: unchanged ones are not written again."""

    def __init__(self, writer: Callable[[str | Path, str], None] = write) -> None:
        self._values: dict[str | Path, str] = {}
        self._write = writer

    def __call__(self, path: str | Path, value: str) -> None:
        if self._values.get(path) != value:
            self._values.pop(path, None)  # unknown if the write fails half-way
            self._write(path, value)
            self._values[path] = value

    def holds(self, path: str | Path, value: str) -> bool:
        return self._values.get(path) == value
