"""One child process with an exact fd layout, awaited through a pidfd; pipe pumps.

``posix_spawn`` (vfork-fast, no Python code between fork and exec) places each
of our pipe ends at the fd number the child must see it at (``fd_actions``), which
``subprocess`` cannot do (``pass_fds`` keeps the parent's numbers); ``spawner.py``
calls it.

Usage::

    child = await spawner.spawn(argv, {0: stdin_r, 1: out_w, 2: err_w, 3: info_w}, env={})
    await pump(out_r, lambda data: sink.write("stdout", data))
    code = await child.wait()

The waits here are plain asyncio (a reader registration and a future; a timer for a
time limit), not anyio's task groups and cancel scopes: they run several times per
run, and anyio's bookkeeping cost about a tenth of the server's CPU per eval
(docs/benchmarks.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import select
import signal
import socket
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import TypeVar

T = TypeVar("T")

READ_CHUNK = 1024 * 1024
PIPE_SIZE = 1024 * 1024
_F_SETPIPE_SZ = 1031


class Child:
    """A spawned process we own: waited for without a watcher thread, killed race-free."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.returncode: int | None = None
        self._pidfd: int | None = os.pidfd_open(pid)

    async def wait(self, within: float | None = None) -> int | None:
        """The exit status; None if it still runs after ``within`` seconds."""
        deadline = _deadline(within)
        while self.returncode is None:
            assert self._pidfd is not None
            if not await readable(self._pidfd, _left(deadline)):
                return None
            self._reap()
        return self.returncode

    def when_ended(self, callback: Callable[[], None]) -> Callable[[], None]:
        """Call ``callback`` (once) from the loop when it has ended; returns the function
        that stops watching (call it before the run lets go of the child)."""
        if self.exited():
            callback()
            return _nothing
        assert self._pidfd is not None

        def ended() -> None:  # a pidfd is readable once its process has exited
            stop()  # (before the reap closes the pidfd)
            self._reap()
            callback()

        stop = _on_readable(self._pidfd, ended)
        return stop

    def exited(self) -> bool:
        """Without waiting: has it ended (reaped now if so)?"""
        pidfd = self._pidfd
        if self.returncode is None and pidfd is not None and _readable_now(pidfd):
            self._reap()
        return self.returncode is not None

    def _reap(self) -> None:
        pid, status = os.waitpid(self.pid, os.WNOHANG)
        if pid == self.pid:
            self.returncode = os.waitstatus_to_exitcode(status)
            self._close()

    def kill(self) -> None:
        if self._pidfd is not None:
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(self._pidfd, signal.SIGKILL)

    def _close(self) -> None:
        if self._pidfd is not None:
            os.close(self._pidfd)
            self._pidfd = None


class PidHandle:
    """A process we do not own (bwrap's namespace init), signalled through a pidfd so a
    recycled pid can never be hit."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self._pidfd: int | None = os.pidfd_open(pid)

    def kill(self) -> None:
        if self._pidfd is not None:
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(self._pidfd, signal.SIGKILL)

    async def gone(self, within: float) -> None:
        """Wait (up to ``within`` s) until it has exited: woken by its pidfd, not polled."""
        if self._pidfd is not None:
            await readable(self._pidfd, within)

    def close(self) -> None:
        if self._pidfd is not None:
            os.close(self._pidfd)
            self._pidfd = None


class StatusChild:
    """A zygote's fork as ``Box`` sees it in place of bwrap (``zygote.py``): its end and
    exit status come over the status pipe (it is not our child); killed through its
    init's pidfd (``init``, which the box closes). ``reported``: the init wrote the
    status (once every other process of the run is gone), or the box learnt the exit
    code from the program itself (``end``)."""

    def __init__(self, init: PidHandle, status_fd: int) -> None:
        self.pid = init.pid
        self.returncode: int | None = None
        self.reported = False
        self._init = init
        self._fd = status_fd
        self._data = b""
        self._on_end: Callable[[], None] | None = None

    async def wait(self, within: float | None = None) -> int | None:
        """The exit status; None if none came within ``within`` seconds."""
        deadline = _deadline(within)
        while self.returncode is None:
            if not await readable(self._fd, _left(deadline)):
                return None
            self._read()
        return self.returncode

    def exited(self) -> bool:
        if self.returncode is None and _readable_now(self._fd):
            self._read()
        return self.returncode is not None

    def when_ended(self, callback: Callable[[], None]) -> Callable[[], None]:
        """As ``Child.when_ended``: on the status, or on ``end``."""
        if self.returncode is not None:
            callback()
            return _nothing
        self._on_end = callback
        stop = _watch(self._fd, self.exited, self._ended)

        def stop_all() -> None:
            self._on_end = None
            stop()

        return stop_all

    def _ended(self) -> None:
        callback, self._on_end = self._on_end, None
        if callback is not None:
            callback()

    def _read(self) -> None:
        os.set_blocking(self._fd, False)
        try:
            chunk = os.read(self._fd, 64)
        except BlockingIOError:
            return
        self._data += chunk
        if chunk and not self._data.endswith(b"\n"):
            return
        try:
            self.returncode = int(self._data)
            self.reported = True
        except ValueError:
            self.returncode = -9  # ended without a word: killed

    def end(self, code: int) -> None:
        """The program's own word on its exit code (``base.end_code``): the run is over."""
        if self.returncode is None:
            self.returncode = code
            self.reported = True
            self._ended()

    def kill(self) -> None:
        self._init.kill()


async def readable(fd: int, within: float | None = None) -> bool:
    """Wait until ``fd`` is readable (or at its end): True; False once ``within``
    seconds have passed first."""
    loop = asyncio.get_running_loop()
    woken: asyncio.Future[bool] = loop.create_future()
    loop.add_reader(fd, resolve, woken, True)
    try:
        return await (woken if within is None else result_within(woken, within, False))
    finally:
        loop.remove_reader(fd)


async def result_within(future: asyncio.Future[T], seconds: float, otherwise: T) -> T:
    """``future``'s result, or ``otherwise`` (given to it) once ``seconds`` have passed."""
    timer = asyncio.get_running_loop().call_later(max(seconds, 0), resolve, future, otherwise)
    try:
        return await future
    finally:
        timer.cancel()


def resolve(future: asyncio.Future[T], value: T) -> None:
    """``future``'s result, unless it has one (or was cancelled)."""
    if not future.done():
        future.set_result(value)


def _watch(fd: int, ended: Callable[[], bool], callback: Callable[[], None]) -> Callable[[], None]:
    """Check ``ended`` each time ``fd`` is readable; once it says so, stop and call
    ``callback``. Returns the stop function (idempotent; before ``fd`` is closed)."""

    def check() -> None:
        if ended():
            stop()
            callback()

    stop = _on_readable(fd, check)
    return stop


def _on_readable(fd: int, callback: Callable[[], None]) -> Callable[[], None]:
    """``callback`` from the loop each time ``fd`` is readable; returns the function that
    stops it (idempotent; call it before ``fd`` is closed)."""
    loop = asyncio.get_running_loop()
    loop.add_reader(fd, callback)
    registered = True

    def stop() -> None:
        nonlocal registered
        if registered:
            registered = False
            loop.remove_reader(fd)

    return stop


def _nothing() -> None:
    pass


def _deadline(within: float | None) -> float | None:
    return None if within is None else asyncio.get_running_loop().time() + within


def _left(deadline: float | None) -> float | None:
    return None if deadline is None else deadline - asyncio.get_running_loop().time()


def _readable_now(fd: int) -> bool:
    """Without waiting: ``fd`` is readable (or at its end). poll, not select: a busy
    server's fds go past select's 1024."""
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    return bool(poller.poll(0))


@contextlib.contextmanager
def socket_of(fd: int) -> Iterator[socket.socket]:
    """A socket object over ``fd``, one of our job sockets (``Fds.socketpair``), for the
    calls only it has (recvmsg, MSG_PEEK, setsockopt); ``fd`` stays open and ours. (Its
    family and type given: else each call asks the kernel three times.)"""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM, 0, fileno=fd)
    try:
        yield sock
    finally:
        sock.detach()


def fd_actions(fds: Mapping[int, int]) -> list[tuple[int, int, int] | tuple[int, int]]:
    """posix_spawn file actions giving the child ``fds`` (child fd -> our fd) and closing
    every other fd of ours it would inherit."""
    leaking = _inheritable_fds() - set(fds.values())
    # Sources go to numbers above every fd involved first, so that neither a
    # target nor closing an inherited fd overwrites one still to be moved.
    high = max([*fds, *fds.values(), *leaking]) + 1
    actions: list[tuple[int, int, int] | tuple[int, int]] = []
    for i, source in enumerate(fds.values()):
        actions.append((os.POSIX_SPAWN_DUP2, source, high + i))
    actions += [(os.POSIX_SPAWN_CLOSE, fd) for fd in sorted(leaking)]
    for i, target in enumerate(fds):
        actions.append((os.POSIX_SPAWN_DUP2, high + i, target))
    actions += [(os.POSIX_SPAWN_CLOSE, high + i) for i in range(len(fds))]
    return actions


def schedule(pids: Iterable[int], *, idle: bool) -> None:
    """SCHED_IDLE (only CPU time nobody else wants; children inherit it) or back to
    the normal class. (posix_spawn cannot start a process in SCHED_IDLE: glibc refuses.)"""
    policy = os.SCHED_IDLE if idle else os.SCHED_OTHER
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.sched_setscheduler(pid, policy, os.sched_param(0))


def _inheritable_fds() -> set[int]:
    """Our fds above 2 without close-on-exec (inherited from whoever started the
    server, or made inheritable by a library): they must not reach a sandbox."""
    found = set()
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        if fd > 2:
            with contextlib.suppress(OSError):
                if not fcntl.fcntl(fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC:
                    found.add(fd)
    return found


class Fds:
    """The fds of one run, closed exactly once."""

    def __init__(self) -> None:
        self._open: set[int] = set()

    def pipe(self, *, big: bool = False) -> tuple[int, int]:
        r, w = os.pipe2(os.O_CLOEXEC)
        if big:
            with contextlib.suppress(OSError):
                fcntl.fcntl(r, _F_SETPIPE_SZ, PIPE_SIZE)
        self._open.update((r, w))
        return r, w

    def socketpair(self) -> tuple[int, int]:
        ours, theirs = (s.detach() for s in socket.socketpair())  # close-on-exec, like pipes
        self._open.update((ours, theirs))
        return ours, theirs

    def adopt(self, fd: int) -> int:
        """Close ``fd`` with the others."""
        self._open.add(fd)
        return fd

    def devnull(self) -> int:
        fd = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
        self._open.add(fd)
        return fd

    def memfd(self, data: bytes) -> int:
        fd = os.memfd_create("bwrap-data", os.MFD_CLOEXEC)
        self._open.add(fd)
        os.write(fd, data)
        os.lseek(fd, 0, os.SEEK_SET)
        return fd

    def close(self, *fds: int) -> None:
        for fd in fds:
            if fd in self._open:
                self._open.discard(fd)
                os.close(fd)

    def close_all(self) -> None:
        self.close(*list(self._open))


async def pump(fd: int, deliver: Callable[[bytes], None]) -> None:
    """Read ``fd`` to EOF, handing each chunk to ``deliver`` as it arrives."""
    loop = asyncio.get_running_loop()
    ended: asyncio.Future[None] = loop.create_future()

    def at_end(error: Exception | None) -> None:
        if ended.done():
            return
        if error is None:
            ended.set_result(None)
        else:  # the pump's own failure, as an awaited read's would be
            ended.set_exception(error)

    stop = read_to_end(fd, deliver, at_end)
    try:
        await ended
    finally:
        stop()


def read_to_end(
    fd: int, deliver: Callable[[bytes], None], at_end: Callable[[Exception | None], None]
) -> Callable[[], None]:
    """Read ``fd`` to EOF from the event loop's reader callback (one registration for
    the whole stream, no task, no wake-up per chunk), handing each chunk to ``deliver``;
    at the end (or a read error) stop and call ``at_end`` once. Returns the function
    that stops reading (idempotent; call it before ``fd`` is closed)."""
    os.set_blocking(fd, False)

    def readable() -> None:
        try:
            data = os.read(fd, READ_CHUNK)
            if data:
                deliver(data)
                return
        except BlockingIOError:
            return
        except Exception as exc:
            stop()
            at_end(exc)
            return
        stop()
        at_end(None)

    stop = _on_readable(fd, readable)
    return stop


async def feed(fd: int, data: bytes) -> None:
    """Write ``data`` to ``fd`` while the reader takes it; a reader that leaves is fine."""
    os.set_blocking(fd, False)
    view = memoryview(data)
    with contextlib.suppress(OSError):  # BrokenPipeError: stdin closed or program ended
        while view:
            await _writable(fd)
            try:
                written = os.write(fd, view[:PIPE_SIZE])
            except BlockingIOError:
                continue
            view = view[written:]


async def _writable(fd: int) -> None:
    loop = asyncio.get_running_loop()
    woken: asyncio.Future[bool] = loop.create_future()
    loop.add_writer(fd, resolve, woken, True)
    try:
        await woken
    finally:
        loop.remove_writer(fd)


class CappedBuffer:
    """Keeps the first ``cap`` bytes; later ones are read and dropped."""

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self.data = bytearray()

    def __call__(self, chunk: bytes) -> None:
        room = self.cap - len(self.data)
        if room > 0:
            self.data += chunk[:room]
