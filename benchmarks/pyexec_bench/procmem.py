"""A process's memory from /proc: RSS now, its peak, and sampling while something runs.

Usage::

    rss_mib(pid)                       # VmRSS now
    with RssWatch(pid) as watch:       # resets VmHWM (root), samples VmRSS every 5 ms
        upload()
    watch.growth_mib                   # peak (sampled or VmHWM) minus RSS at the start
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from pathlib import Path
from types import TracebackType

SAMPLE_SECONDS = 0.005


def status_kib(pid: int, key: str) -> int | None:
    """A ``Vm*`` line of /proc/<pid>/status, in KiB (None: no such process or line)."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return None


def rss_mib(pid: int) -> float | None:
    kib = status_kib(pid, "VmRSS")
    return None if kib is None else kib / 1024


def descendants(pid: int) -> list[int]:
    """``pid`` and every process below it (through /proc/<pid>/task/*/children)."""
    found: list[int] = []
    todo = [pid]
    while todo and len(found) < 10_000:
        current = todo.pop()
        found.append(current)
        for task in Path(f"/proc/{current}/task").glob("*/children"):
            with contextlib.suppress(OSError):
                todo += [int(c) for c in task.read_text().split()]
    return found


def tree_rss_mib(pid: int) -> float:
    return sum(rss_mib(p) or 0.0 for p in descendants(pid))


def tree_cpu_seconds(pid: int) -> float:
    """User + system CPU of ``pid`` and its live descendants."""
    ticks = 0
    for p in descendants(pid):
        with contextlib.suppress(OSError, IndexError, ValueError):
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
            ticks += int(fields[11]) + int(fields[12])  # utime, stime
    return ticks / os.sysconf("SC_CLK_TCK")


def wait_idle(pid: int, seconds: float, busy_fraction: float = 0.05) -> bool:
    """Wait (at most ``seconds``) until the tree used under ``busy_fraction`` of a CPU
    over half a second; False when it never did."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        before = tree_cpu_seconds(pid)
        time.sleep(0.5)
        if tree_cpu_seconds(pid) - before < 0.5 * busy_fraction:
            return True
    return False


def reset_peak(pid: int) -> bool:
    """Reset VmHWM to the current RSS (``echo 5 > clear_refs``; needs to own the process)."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def pid_listening_on(port: int) -> int | None:
    """The pid of the process with a listening TCP socket on ``port`` (any address)."""
    inodes = _listening_inodes(port)
    if not inodes:
        return None
    for pid in filter(str.isdigit, os.listdir("/proc")):
        with contextlib.suppress(OSError):
            for fd in os.listdir(f"/proc/{pid}/fd"):
                link = os.readlink(f"/proc/{pid}/fd/{fd}")
                if link.startswith("socket:[") and link[8:-1] in inodes:
                    return int(pid)
    return None


def _listening_inodes(port: int) -> set[str]:
    found: set[str] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(table).read_text().splitlines()[1:]:
                fields = line.split()
                local, state, inode = fields[1], fields[3], fields[9]
                if state == "0A" and int(local.rsplit(":", 1)[1], 16) == port:
                    found.add(inode)
    return found


class RssWatch:
    """Peak RSS of ``pid`` over a ``with`` block: sampled, and VmHWM when it can be reset."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.start_mib = 0.0
        self.sampled_peak_mib = 0.0
        self.hwm_mib: float | None = None
        self._hwm_reset = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def __enter__(self) -> RssWatch:
        self._hwm_reset = reset_peak(self.pid)
        self.start_mib = rss_mib(self.pid) or 0.0
        self.sampled_peak_mib = self.start_mib
        self._thread.start()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._stop.set()
        self._thread.join()
        hwm = status_kib(self.pid, "VmHWM")
        if self._hwm_reset and hwm is not None:
            self.hwm_mib = hwm / 1024

    def _sample(self) -> None:
        while not self._stop.wait(SAMPLE_SECONDS):
            now = rss_mib(self.pid)
            if now is None:
                return
            self.sampled_peak_mib = max(self.sampled_peak_mib, now)

    @property
    def peak_mib(self) -> float:
        return max(self.sampled_peak_mib, self.hwm_mib or 0.0)

    @property
    def growth_mib(self) -> float:
        return self.peak_mib - self.start_mib


def _machine_busy_seconds() -> float:
    """CPU time the whole machine spent not idle (user, nice, system, irq, softirq)."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:8]]
    user, nice, system, _idle, _iowait, irq, softirq = fields
    return (user + nice + system + irq + softirq) / os.sysconf("SC_CLK_TCK")


def _process_seconds(pid: int) -> float | None:
    """User + system CPU of ``pid``, all its threads (not its children)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class CpuWatch:
    """CPU used over a ``with`` block: the machine's, the server process's, this process's.

    The machine's minus the other two is what the sandboxes, their zygotes and the
    kernel's threads used (plus anything else running on the machine meanwhile).
    """

    def __init__(self, server_pid: int | None) -> None:
        self.server_pid = server_pid
        self.machine_s = self.server_s = self.client_s = 0.0
        self._start: tuple[float, float | None, float] = (0.0, None, 0.0)

    def _now(self) -> tuple[float, float | None, float]:
        server = _process_seconds(self.server_pid) if self.server_pid else None
        times = os.times()
        return _machine_busy_seconds(), server, times.user + times.system

    def __enter__(self) -> CpuWatch:
        self._start = self._now()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        machine, server, client = self._now()
        self.machine_s = machine - self._start[0]
        start_server = self._start[1]
        if server is not None and start_server is not None:
            self.server_s = server - start_server
        self.client_s = client - self._start[2]

    @property
    def others_s(self) -> float:
        return max(0.0, self.machine_s - self.server_s - self.client_s)
