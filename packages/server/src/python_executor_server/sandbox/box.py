"""One bwrap sandbox from spawn to cleanup: its fds, processes, cgroup slot, network.

``Launcher.start`` fills a ``Box`` (spawned, confined, command starting); ``run``
hands it its run (the job, stdin, the timeout) and supervises it to the end. Output
goes to the sink as it arrives and is drained to EOF (the sink caps it; the program
runs on).

Every process of a run is in its pid namespace and its cgroup: killing the
namespace init takes the namespace down (setsid'd and double-forked processes
included), and the cgroup is swept with SIGKILL until empty.

Usage::

    box = Box()
    try:
        await launcher.start(spec, box, tmp)
        outcome = await box.run(spec, sink, job)
    finally:
        await box.cleanup(cgroups)
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
from collections.abc import Callable
from dataclasses import dataclass, field

import anyio

from .base import OutputSink, RunOutcome, RunSpec, end_code
from .cgroups import Cgroups, Slot
from .network import NetworkAttachment
from .process import (
    CappedBuffer,
    Child,
    Fds,
    PidHandle,
    StatusChild,
    feed,
    read_to_end,
    resolve,
    result_within,
    schedule,
    socket_of,
)

SIDE_CHANNEL_CAP = 1024 * 1024
KILL_GRACE = 1.0  # after SIGKILL of the init, for bwrap to report and exit
DRAIN_GRACE = 5.0  # for the pipes to reach EOF once every process is gone
SWEEP_FIRST_POLL = 0.0002
SWEEP_LAST_POLL = 0.02  # then 40 ms of polling are over: a thread takes the rest


@dataclass
class Pipes:
    out: tuple[int, int]
    err: tuple[int, int]
    info: tuple[int, int]
    block: tuple[int, int]
    stdin: tuple[int, int]  # a pipe even without input: a pooled sandbox has it from the start
    result: tuple[int, int] | None
    job: tuple[int, int] | None  # a socket pair: (ours, the sandbox's)

    @classmethod
    def create(cls, fds: Fds, *, result: bool, job: bool) -> Pipes:
        big = (fds.pipe(big=True), fds.pipe(big=True))
        small = (fds.pipe(), fds.pipe(), fds.pipe())
        return cls(*big, *small, fds.pipe() if result else None, fds.socketpair() if job else None)


@dataclass(eq=False)
class Box:
    """What one sandbox holds; released by ``cleanup`` whatever happened."""

    fds: Fds = field(default_factory=Fds)
    pipes: Pipes | None = None
    child: Child | StatusChild | None = None  # bwrap (through setpriv), or a zygote's fork
    init: PidHandle | None = None  # its namespace init, once reported
    slot: Slot | None = None
    network: NetworkAttachment | None = None
    released: bool = False  # confined and told to start the command
    idle: bool = False  # started ahead at SCHED_IDLE: ``wake`` before its run
    done: asyncio.Event = field(default_factory=asyncio.Event)

    def kill(self) -> None:  # from outside the run's own task
        for process in (self.init, self.child):
            if process is not None:
                process.kill()

    def alive(self) -> bool:
        """bwrap still runs (a sandbox in the pool can die: OOM killer, a signal)."""
        return self.child is not None and self.released and not self.child.exited()

    def wake(self) -> None:
        """Normal scheduling for a sandbox started ahead at SCHED_IDLE (bwrap's pool; a
        zygote's forks never are): bwrap, its init and the waiting program; whatever the
        run starts inherits it."""
        if not self.idle:
            return
        pids = [p.pid for p in (self.child, self.init) if p is not None]
        if self.init is not None:  # the waiting program: the init's only child
            children = f"/proc/{self.init.pid}/task/{self.init.pid}/children"
            with contextlib.suppress(OSError), open(children) as f:
                pids += [int(pid) for pid in f.read().split()]
        schedule(pids, idle=False)

    def ready(self) -> bool:
        """The pre-started program reported ready on its job socket (without waiting)."""
        if self.pipes is None or self.pipes.job is None or not self.alive():
            return False
        with socket_of(self.pipes.job[0]) as sock:  # its byte, left unread; EOF: it died
            try:
                return sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) != b""
            except BlockingIOError:
                return False

    def stderr_head(self) -> str:
        """What bwrap wrote before failing to start (without waiting)."""
        if self.pipes is None:
            return ""
        os.set_blocking(self.pipes.err[0], False)
        try:
            data = os.read(self.pipes.err[0], 4096)
        except OSError:
            return ""
        return data.decode("utf-8", "replace").strip()[-500:]

    async def run(self, spec: RunSpec, sink: OutputSink, job: bytes | None) -> RunOutcome:
        """Send ``job`` and ``spec.stdin``, wait for the end or the timeout, kill what is
        left, drain the output. The timeout clock starts here. (Reader callbacks, futures
        and timers of the loop, not tasks: ``process.py``.)"""
        side = CappedBuffer(SIDE_CHANNEL_CAP)
        head = CappedBuffer(4096)  # bwrap's own error, if it fails
        output = _Output(self._streams(sink, side, head), lambda: self._said_end(side))
        feeding: list[asyncio.Task[None]] = []
        timed_out = False
        try:
            if self.released:
                feeding = self._send(spec, job)
                timed_out = await self._until_over(spec.limits.timeout_seconds)
            await self.terminate()
            await output.drained(DRAIN_GRACE)
        finally:
            output.stop()
            await _cancel(feeding)
        output.raise_failure()
        error = self._setup_error(bytes(head.data))
        return self._outcome(timed_out, bytes(side.data), error)

    def _streams(
        self, sink: OutputSink, side: CappedBuffer, head: CappedBuffer
    ) -> list[tuple[int, Callable[[bytes], None]]]:
        assert self.pipes is not None

        def on_stderr(data: bytes) -> None:
            head(data)
            sink.write("stderr", data)

        streams: list[tuple[int, Callable[[bytes], None]]] = [
            (self.pipes.out[0], lambda data: sink.write("stdout", data)),
            (self.pipes.err[0], on_stderr),
        ]
        if self.pipes.result is not None:
            streams.append((self.pipes.result[0], side))
        return streams

    def _send(self, spec: RunSpec, job: bytes | None) -> list[asyncio.Task[None]]:
        """The job and stdin on their way; the tasks still writing what did not fit."""
        assert self.pipes is not None
        pipes, loop = self.pipes, asyncio.get_running_loop()
        feeding = []
        rest = _send_now(pipes.job[0], job) if job is not None and pipes.job else b""
        if rest and pipes.job is not None:
            feeding.append(loop.create_task(feed(pipes.job[0], rest)))
        if spec.stdin:
            feeding.append(loop.create_task(self._feed_stdin(spec.stdin)))
        else:
            self.fds.close(pipes.stdin[1])  # EOF for the program at once
        return feeding

    async def _until_over(self, limit: float) -> bool:
        """Wait for the run's end; True when the time limit came first."""
        assert self.child is not None
        over: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        stop = self.child.when_ended(lambda: resolve(over, False))
        try:
            return await result_within(over, limit, True)
        finally:
            stop()

    def _said_end(self, side: CappedBuffer) -> None:
        """Once the output is drained: a zygote's fork can end before its init reports,
        when the program said its exit code on the side channel (``end_code``) and
        every copy of its output is closed."""
        if isinstance(self.child, StatusChild):
            code = end_code(bytes(side.data))
            if code is not None:
                self.child.end(code)  # (ends ``_until_over``)

    async def _feed_stdin(self, data: bytes) -> None:
        assert self.pipes is not None
        try:
            await feed(self.pipes.stdin[1], data)
        finally:
            self.fds.close(self.pipes.stdin[1])  # EOF for the program

    def _setup_error(self, stderr_head: bytes) -> str | None:
        """bwrap never consumed the block byte (or never got it): it failed before
        starting the command, and said why on stderr."""
        assert self.pipes is not None
        if self.child is not None and self.child.returncode == 0:
            return None
        os.set_blocking(self.pipes.block[0], False)
        try:
            unread = self.init is None or os.read(self.pipes.block[0], 1) == b"x"
        except BlockingIOError:
            unread = False
        if not unread:
            return None
        message = stderr_head.decode("utf-8", "replace").strip().splitlines()
        return "sandbox setup failed: " + (message[-1] if message else "bwrap exited early")

    def _outcome(self, timed_out: bool, side: bytes, error: str | None) -> RunOutcome:
        assert self.child is not None
        code = self.child.returncode
        usage = self.slot.usage() if self.slot is not None else None
        return RunOutcome(
            exit_code=None if timed_out or error or code is None or code < 0 else code,
            timed_out=timed_out,
            oom_killed=bool(usage and usage.oom_killed),
            side_channel=side,
            cpu_ms=usage.cpu_ms if usage else None,
            peak_memory_mb=usage.peak_memory_mb if usage else None,
            error=error,
        )

    def end_reported(self) -> bool:
        """A zygote's fork whose end was reported: by its init, which killed and reaped
        every other process of the run first, or by its program on its way out (the
        output complete). Killing the init (``terminate``) ends what is left; waiting for
        that is ``cleanup``'s, which the answer need not wait for."""
        return isinstance(self.child, StatusChild) and self.child.reported

    async def terminate(self) -> None:
        """Kill every process of the sandbox and reap bwrap (a fork whose end was
        reported: killed, the wait left to ``cleanup``). Idempotent, quick."""
        if self.init is not None:
            self.init.kill()  # the pid namespace goes down with its init
        if not self.end_reported():
            await self._reap()
        elif self.slot is not None:  # none of the run's code runs after its answer
            self.slot.signal_all(signal.SIGKILL)

    async def _reap(self) -> None:
        """Wait until every process of the sandbox is gone (after ``terminate``'s kill)."""
        if self.child is not None and self.child.returncode is None:
            await self.child.wait(KILL_GRACE if self.init is not None else 0)
            self.child.kill()
            await self.child.wait()
        elif self.init is not None:  # a zygote's fork: its init reported, and is exiting
            await self.init.gone(within=KILL_GRACE)
        if self.slot is not None:
            await _sweep(self.slot)

    async def cleanup(self, cgroups: Cgroups | None) -> None:
        """Kill, wait until every process is gone, then release everything. Shielded by
        the caller."""
        try:
            if self.init is not None:
                self.init.kill()
            await self._reap()  # (``terminate`` leaves this to us for a reported end)
            if self.network is not None:
                await self.network.close()
        finally:
            self.fds.close_all()
            if self.init is not None:
                self.init.close()
            if self.slot is not None and cgroups is not None:
                cgroups.release(self.slot)
            self.done.set()


class _Output:
    """A run's output streams, read to their ends by the loop (``read_to_end``);
    ``on_drained`` once all are."""

    def __init__(
        self, streams: list[tuple[int, Callable[[bytes], None]]], on_drained: Callable[[], None]
    ) -> None:
        self._left = len(streams)
        self._failed: list[Exception] = []
        self._on_drained = on_drained
        self._drained: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._stops = [read_to_end(fd, deliver, self._at_end) for fd, deliver in streams]

    def _at_end(self, error: Exception | None) -> None:
        if error is not None:
            self._failed.append(error)
        self._left -= 1
        if not self._left:
            resolve(self._drained, None)
            self._on_drained()

    async def drained(self, within: float) -> None:
        """Wait (up to ``within`` s) until every stream is at its end."""
        if not self._drained.done():
            await result_within(self._drained, within, None)

    def stop(self) -> None:
        for stop in self._stops:
            stop()

    def raise_failure(self) -> None:
        """A stream's own read error, as an awaited read's would be."""
        if self._failed:
            raise self._failed[0]


async def _cancel(tasks: list[asyncio.Task[None]]) -> None:
    for task in tasks:
        task.cancel()
    if tasks:
        await asyncio.gather(*tasks, return_exceptions=True)


def _send_now(fd: int, data: bytes) -> bytes:
    """Write what ``fd`` takes of ``data`` without waiting (a job: all of it, a few
    hundred bytes into an empty socket), saving a task; the rest is returned for ``feed``
    (nothing when the program is gone: its run says so)."""
    os.set_blocking(fd, False)
    try:
        return data[os.write(fd, data) :]
    except BlockingIOError:
        return data
    except OSError:
        return b""


async def _sweep(slot: Slot) -> None:
    """Wait for the cgroup to empty, killing what is in it. bwrap reports the command's
    end before its namespace init has finished dying: usually a few processes are still
    exiting here, gone within a millisecond, so poll finely on the loop rather than
    hand the wait to a thread; the thread (which also gives up) takes long stragglers."""
    delay = SWEEP_FIRST_POLL
    while slot.pids():
        if delay > SWEEP_LAST_POLL:
            await anyio.to_thread.run_sync(slot.kill_all)
            return
        slot.signal_all(signal.SIGKILL)
        await asyncio.sleep(delay)
        delay *= 2
