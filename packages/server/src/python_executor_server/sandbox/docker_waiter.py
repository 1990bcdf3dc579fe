"""The program each Docker sandbox container runs as its pid 1: it waits for one job.

It is never imported by the server: its source is handed to the image's
``python3 -I -S -c`` as the container command (``docker_protocol.waiter_command``),
so it uses only the standard library of Python 3.8+ and imports nothing of ours.

Protocol (integers big-endian) over the container's attached stdin/stdout:

* in: ``u32 n`` + ``n`` bytes of JSON ``{argv, env, result_fd, tar_size,
  stdin_size, timeout}``, then ``tar_size`` bytes of an uncompressed tar of the
  project (extracted into /work), then ``stdin_size`` bytes of the program's
  standard input. EOF on stdin at any time means the server is gone:
  everything is killed and the container exits (and is auto-removed).
* out: frames ``kind(1) + u32 n + n bytes``: ``o``/``e`` program
  stdout/stderr, ``r`` bytes written to ``result_fd``, ``f`` a setup failure
  message, ``x`` the final JSON ``{exit_code, cpu_ms, peak_memory_mb, oom_kills}``.

User processes never hold the container's stdout: they write into pipes that
this relay frames, so they cannot forge a frame; the relay makes itself
non-dumpable so /proc/1/{mem,fd} stay closed to them. When the main process
exits, every other process of the container is killed before the result and
exit frames are sent, so nothing can write to ``result_fd`` afterwards.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import resource
import select
import shutil
import signal
import struct
import tarfile
import time
from typing import Any

WORKDIR = "/work"
CHUNK = 65536
FIRST_PRIVATE_FD = 100  # our own descriptors live at or above this, close-on-exec


def write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def send(kind: bytes, data: bytes) -> None:
    write_all(1, kind + struct.pack(">I", len(data)) + data)


def read_exact(n: int) -> bytes:
    parts = []
    while n > 0:
        part = os.read(0, min(n, CHUNK))
        if not part:
            raise EOFError("the server went away")
        parts.append(part)
        n -= len(part)
    return b"".join(parts)


class Reader:
    """A file-like view of the next ``size`` bytes of stdin, for tarfile."""

    def __init__(self, size: int) -> None:
        self.left = size

    def read(self, n: int = -1) -> bytes:
        n = self.left if n < 0 else min(n, self.left)
        data = read_exact(n) if n else b""
        self.left -= len(data)
        return data


def extract(size: int) -> None:
    reader = Reader(size)
    with tarfile.open(fileobj=reader, mode="r|") as tar:  # type: ignore[call-overload]
        if hasattr(tarfile, "data_filter"):
            tar.extractall(WORKDIR, filter="data")
        else:  # an old 3.x image; the tar is ours and this is inside the container
            tar.extractall(WORKDIR)
    while reader.left:
        reader.read(CHUNK)


PR_SET_DUMPABLE = 4
LIBC: Any = None


def set_dumpable(value: int) -> None:
    global LIBC
    try:
        if LIBC is None:
            import ctypes

            LIBC = ctypes.CDLL(None)
        LIBC.prctl(PR_SET_DUMPABLE, value, 0, 0, 0)
    except Exception:  # an image without libffi still works, a little less hardened
        pass


def private_pipe() -> tuple[int, int]:
    ends = []
    for fd in os.pipe():
        ends.append(fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, FIRST_PRIVATE_FD))
        os.close(fd)
    return ends[0], ends[1]


def kill_all() -> None:
    for _ in range(2):  # a second sweep catches a child forked during the first
        with contextlib.suppress(OSError):
            os.kill(-1, signal.SIGKILL)  # from pid 1: every process but us


def resolve(argv0: str) -> str:
    if "/" in argv0:
        return argv0
    found = shutil.which(argv0)  # the image's PATH, not the program's
    if found is None:
        raise FileNotFoundError(f"{argv0} is not on the image's PATH")
    return found


def raise_oom_score() -> None:
    # Under memory pressure the kernel must pick the program, not this relay
    # (tmpfs pages count against the limit but in nobody's RSS). Raising the
    # score needs no privilege, but a non-dumpable process cannot write its
    # /proc files: the child (about to exec anyway) becomes dumpable first.
    set_dumpable(1)
    try:
        with open("/proc/self/oom_score_adj", "w") as f:
            f.write("1000")
    except OSError:
        pass


def spawn(job: dict[str, Any], stdin_r: int, out_w: int, err_w: int) -> int:
    argv = [resolve(job["argv"][0]), *job["argv"][1:]]
    pid = os.fork()
    if pid:
        return pid
    try:  # the child: set up fds, exec; never returns into the relay
        for target, fd in ((0, stdin_r), (1, out_w), (2, err_w)):
            os.dup2(fd, target)
        signal.signal(signal.SIGPIPE, signal.SIG_DFL)
        raise_oom_score()
        os.chdir(WORKDIR)
        os.execve(argv[0], argv, job["env"])
    except BaseException as exc:
        os.write(2, f"cannot execute {argv[0]}: {exc}\n".encode())
    os._exit(127)


class Relay:
    """Moves bytes between the server and the program until the program exits."""

    def __init__(self, job: dict[str, Any], pid: int, outs: dict[int, bytes], stdin_w: int):
        self.pid = pid
        self.status: int | None = None
        self.outs = outs  # our read end -> frame kind
        self.stdin_w: int | None = stdin_w
        self.stdin_left: int = job["stdin_size"]
        self.pending = b""
        self.deadline = time.monotonic() + job["timeout"]
        os.set_blocking(stdin_w, False)
        self.close_stdin_if_done()

    def reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            if pid == self.pid:
                sig = os.WTERMSIG(status) if os.WIFSIGNALED(status) else 0
                self.status = 128 + sig if sig else os.WEXITSTATUS(status)

    def close_stdin_if_done(self) -> None:
        if self.stdin_w is not None and not self.pending and not self.stdin_left:
            os.close(self.stdin_w)
            self.stdin_w = None

    def from_server(self) -> None:
        data = os.read(0, min(CHUNK, self.stdin_left) if self.stdin_left else CHUNK)
        if not data:  # the server is gone (crash, cancel): take everything down
            kill_all()
            os._exit(3)
        if self.stdin_left:
            self.stdin_left -= len(data)
            if self.stdin_w is not None:
                self.pending = data
        self.close_stdin_if_done()

    def to_program(self) -> None:
        assert self.stdin_w is not None
        try:
            self.pending = self.pending[os.write(self.stdin_w, self.pending) :]
        except BlockingIOError:
            return
        except OSError:  # the program closed its stdin: drop the rest
            self.pending = b""
            os.close(self.stdin_w)
            self.stdin_w = None
        self.close_stdin_if_done()

    def from_program(self, fd: int) -> None:
        data = os.read(fd, CHUNK)
        if data:
            send(self.outs[fd], data)
        else:
            os.close(fd)
            del self.outs[fd]

    def step(self, wake: int, timeout: float) -> None:
        reads = [wake, *self.outs] + ([] if self.pending else [0])
        writes = [self.stdin_w] if self.pending and self.stdin_w is not None else []
        readable, writable, _ = select.select(reads, writes, [], timeout)
        if wake in readable:
            os.read(wake, 4096)
            self.reap()
        if 0 in readable:
            self.from_server()
        if writable:
            self.to_program()
        for fd in readable:
            if fd in self.outs:
                self.from_program(fd)

    def run(self, wake: int) -> None:
        while self.status is None:
            left = self.deadline - time.monotonic()
            if left <= 0:  # a backstop only: the server kills the container first
                break
            self.step(wake, left)
        if self.stdin_w is not None:
            os.close(self.stdin_w)
        kill_all()
        while self.outs:  # every writer is dead now: read to EOF
            for fd in select.select(list(self.outs), [], [])[0]:
                self.from_program(fd)
        self.reap()


def free_tmpfs() -> None:
    for top in (WORKDIR, "/tmp"):
        try:
            names = os.listdir(top)
        except OSError:
            continue
        for name in names:
            path = os.path.join(top, name)
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path, ignore_errors=True)
            else:
                with contextlib.suppress(OSError):
                    os.unlink(path)


def cgroup_peak_bytes() -> int | None:
    for path in ("/sys/fs/cgroup/memory/memory.max_usage_in_bytes", "/sys/fs/cgroup/memory.peak"):
        try:
            with open(path) as f:
                return int(f.read().split()[0])
        except (OSError, ValueError, IndexError):
            continue
    return None


def oom_kills() -> int | None:
    for path in ("/sys/fs/cgroup/memory/memory.oom_control", "/sys/fs/cgroup/memory.events"):
        try:
            with open(path) as f:
                for line in f:
                    key, _, value = line.partition(" ")
                    if key == "oom_kill":
                        return int(value)
        except (OSError, ValueError):
            continue
    return None


def finish(status: int | None) -> None:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    peak = cgroup_peak_bytes()
    report = {
        "exit_code": status,
        "cpu_ms": int((usage.ru_utime + usage.ru_stime) * 1000),
        "peak_memory_mb": round((peak if peak else usage.ru_maxrss * 1024) / 2**20, 2),
        "oom_kills": oom_kills(),
    }
    send(b"x", json.dumps(report).encode())


def start(job: dict[str, Any]) -> Relay:
    (in_r, in_w), (out_r, out_w), (err_r, err_w) = private_pipe(), private_pipe(), private_pipe()
    outs = {out_r: b"o", err_r: b"e"}
    result_fd = job.get("result_fd")
    if result_fd is not None:
        report_r, report_w = private_pipe()
        os.dup2(report_w, result_fd)  # inheritable: the program gets it at result_fd
        os.close(report_w)
        outs[report_r] = b"r"
    pid = spawn(job, in_r, out_w, err_w)
    for fd in (in_r, out_w, err_w, result_fd):
        if fd is not None:
            os.close(fd)
    return Relay(job, pid, outs, in_w)


def main() -> None:
    set_dumpable(0)
    signal.signal(signal.SIGPIPE, signal.SIG_IGN)
    wake_r, wake_w = private_pipe()
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    try:
        job = json.loads(read_exact(struct.unpack(">I", read_exact(4))[0]))
    except EOFError:
        return  # the server dropped this warm container
    try:
        if job["tar_size"]:
            extract(job["tar_size"])
        relay = start(job)
    except Exception as exc:  # the project does not fit, python3 missing, ...
        send(b"f", f"{type(exc).__name__}: {exc}".encode())
        return
    relay.run(wake_r)
    if relay.status == 128 + signal.SIGKILL:
        free_tmpfs()  # after an OOM kill, files there may still hold the memory we need
    finish(relay.status)


if __name__ == "__main__":
    main()
