"""Time limits, kills and cancellation: nothing of a run survives it, however it hides.

The harness scans /proc for the run's marker after every run; the tests here
add the ways a program tries to outlive its run.
"""

from __future__ import annotations

import os
import time

import anyio
import pytest
from bwrap_harness import Harness, eventually, marker_pids
from python_executor_server.sandbox.base import CollectedOutput

pytestmark = pytest.mark.sandbox

SETSID_ESCAPEE = """
import os, sys, time
if os.fork() == 0:
    os.setsid()
    print('escapee', os.getpid(), flush=True)
    time.sleep(600)
    os._exit(0)
time.sleep(0.5)
print('parent done', flush=True)
"""

DAEMON = """
import os, sys, time
if os.fork() == 0:
    os.setsid()
    if os.fork() == 0:  # the classic double fork: reparented to init
        os.chdir('/')
        for fd in (0, 1, 2):
            os.close(fd)
        time.sleep(600)
        os._exit(0)
    os._exit(0)
os.wait()
print('daemonised', flush=True)
"""


@pytest.mark.timeout(60)
async def test_sleep_past_the_timeout_is_killed_with_output_kept(sandbox: Harness) -> None:
    ran = await sandbox.run(
        """
        import sys, time
        print('before the sleep', flush=True)
        print('on stderr too', file=sys.stderr, flush=True)
        time.sleep(600)
        print('never')
        """,
        timeout_seconds=1.5,
    )
    assert ran.outcome.timed_out
    assert ran.outcome.exit_code is None
    assert ran.stdout == "before the sleep\n"
    assert ran.stderr == "on stderr too\n"
    assert 1.4 <= ran.elapsed < 4


@pytest.mark.timeout(60)
async def test_busy_threads_are_killed_at_the_timeout(sandbox: Harness) -> None:
    ran = await sandbox.run(
        """
        import threading
        def spin():
            while True:
                pass
        print('spinning', flush=True)
        for _ in range(8):
            threading.Thread(target=spin).start()
        """,
        timeout_seconds=1.5,
    )
    assert ran.outcome.timed_out and ran.stdout == "spinning\n"
    assert ran.elapsed < 4
    assert ran.outcome.cpu_ms is not None and ran.outcome.cpu_ms > 200


@pytest.mark.timeout(60)
async def test_setsid_escapee_is_gone_after_a_normal_exit(sandbox: Harness) -> None:
    ran = await sandbox.run(SETSID_ESCAPEE)
    assert ran.outcome.exit_code == 0 and not ran.outcome.timed_out
    assert "escapee" in ran.stdout and "parent done" in ran.stdout
    assert ran.elapsed < 5  # the escapee holding stdout open did not keep the run alive


@pytest.mark.timeout(60)
async def test_setsid_escapee_is_gone_after_a_timeout(sandbox: Harness) -> None:
    ran = await sandbox.run(SETSID_ESCAPEE + "time.sleep(600)\n", timeout_seconds=1.5)
    assert ran.outcome.timed_out and "escapee" in ran.stdout


@pytest.mark.timeout(60)
async def test_daemonised_grandchild_is_gone_after_the_run(sandbox: Harness) -> None:
    ran = await sandbox.run(DAEMON)
    assert ran.outcome.exit_code == 0 and ran.stdout == "daemonised\n"


@pytest.mark.timeout(60)
async def test_a_process_ignoring_signals_is_still_killed(sandbox: Harness) -> None:
    ran = await sandbox.run(
        """
        import signal, time
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT):
            signal.signal(sig, signal.SIG_IGN)
        print('stubborn', flush=True)
        time.sleep(600)
        """,
        timeout_seconds=1,
    )
    assert ran.outcome.timed_out and ran.elapsed < 4


@pytest.mark.timeout(60)
async def test_cancellation_kills_everything_within_a_second(sandbox: Harness) -> None:
    work = await sandbox.workspace({"main.py": SETSID_ESCAPEE + "time.sleep(600)\n"})
    marker = os.urandom(6).hex()
    spec = sandbox.spec(work, marker=marker, timeout_seconds=120)
    out = CollectedOutput()
    cancelled_at = 0.0
    async with anyio.create_task_group() as tg:
        tg.start_soon(sandbox.backend.run, spec, out)
        await eventually(lambda: "parent done" in out.text("stdout"))
        assert len(marker_pids(marker)) == 2
        cancelled_at = time.monotonic()
        tg.cancel_scope.cancel()
    took = time.monotonic() - cancelled_at
    assert took < 1.0, f"cancellation took {took:.2f}s"
    assert marker_pids(marker) == []


@pytest.mark.timeout(60)
async def test_cancellation_during_setup_leaves_nothing(sandbox: Harness) -> None:
    for delay in (0.0, 0.005, 0.01, 0.02, 0.04):
        work = await sandbox.workspace({"main.py": "import time\ntime.sleep(600)\n"})
        marker = os.urandom(6).hex()
        spec = sandbox.spec(work, marker=marker)
        with anyio.move_on_after(delay):
            await sandbox.backend.run(spec, CollectedOutput())
        assert marker_pids(marker) == []
    await _still_runs(sandbox)


@pytest.mark.timeout(60)
async def test_close_kills_live_runs(sandbox: Harness) -> None:
    work = await sandbox.workspace({"main.py": DAEMON + "time.sleep(600)\n"})
    marker = os.urandom(6).hex()
    spec = sandbox.spec(work, marker=marker, timeout_seconds=120)
    out = CollectedOutput()
    outcome = []

    async def run() -> None:
        outcome.append(await sandbox.backend.run(spec, out))

    async with anyio.create_task_group() as tg:
        tg.start_soon(run)
        await eventually(lambda: "daemonised" in out.text("stdout"))
        await sandbox.backend.close()
    assert marker_pids(marker) == []
    assert outcome and outcome[0].exit_code is None and not outcome[0].timed_out


@pytest.mark.timeout(60)
async def test_concurrent_runs_do_not_disturb_each_other(sandbox: Harness) -> None:
    results: dict[int, str] = {}

    async def one(i: int) -> None:
        ran = await sandbox.run(f"import time; time.sleep(0.3); print({i} * 7)")
        results[i] = ran.stdout

    async with anyio.create_task_group() as tg:
        for i in range(6):
            tg.start_soon(one, i)
    assert results == {i: f"{i * 7}\n" for i in range(6)}


async def _still_runs(sandbox: Harness) -> None:
    ran = await sandbox.run("print('ok')")
    assert ran.stdout == "ok\n"
