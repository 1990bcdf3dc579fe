"""Every limit of the bwrap backend, each met by a hostile program and observed holding."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import anyio
import pytest
from bwrap_harness import Harness, cgroup_file, eventually, marker_pids
from python_executor_server.sandbox.base import CollectedOutput

pytestmark = pytest.mark.sandbox
MIB = 1024 * 1024


async def _hello_still_works(sandbox: Harness) -> None:
    ran = await sandbox.run("print('still alive')")
    assert ran.stdout == "still alive\n" and ran.outcome.exit_code == 0


# --- memory -------------------------------------------------------------------------


@pytest.mark.timeout(60)
async def test_memory_bomb_is_oom_killed_with_peak_reported(sandbox: Harness) -> None:
    ran = await sandbox.run(
        """
        hog = []
        print('allocating', flush=True)
        while True:
            hog.append(bytearray(8 * 1024 * 1024))  # zero-filled: really touched
        """,
        memory_mb=128,
    )
    assert ran.outcome.oom_killed
    assert ran.outcome.exit_code == 128 + 9  # SIGKILL from the OOM killer
    assert not ran.outcome.timed_out
    assert ran.stdout == "allocating\n"  # output before the kill is kept
    assert ran.outcome.peak_memory_mb is not None
    assert 100 <= ran.outcome.peak_memory_mb <= 128.5
    await _hello_still_works(sandbox)


@pytest.mark.timeout(90)
async def test_each_run_of_a_reused_cgroup_reports_its_own_usage(sandbox: Harness) -> None:
    # A cgroup slot is reused run after run, its control files kept open (cgroups.py):
    # every run's counters must be read afresh, never the previous run's.
    hog = """
        import time
        block = bytearray(80 * 1024 * 1024)
        end = time.process_time() + 0.4
        while time.process_time() < end:
            pass
        """
    bomb = "hog = []\nwhile True:\n    hog.append(bytearray(8 * 1024 * 1024))\n"
    for _ in range(2):
        big = await sandbox.run(hog, memory_mb=256)
        assert big.outcome.exit_code == 0 and not big.outcome.oom_killed, big.stderr
        assert big.outcome.peak_memory_mb is not None and big.outcome.peak_memory_mb >= 80
        assert big.outcome.cpu_ms is not None and big.outcome.cpu_ms >= 350
        small = await sandbox.run("print('small')", memory_mb=256)
        assert small.outcome.exit_code == 0 and not small.outcome.oom_killed
        assert small.outcome.peak_memory_mb is not None and small.outcome.peak_memory_mb < 60
        assert small.outcome.cpu_ms is not None and small.outcome.cpu_ms < 300
        killed = await sandbox.run(bomb, memory_mb=96)
        assert killed.outcome.oom_killed
        after = await sandbox.run("print('after')", memory_mb=96)
        assert after.outcome.exit_code == 0 and not after.outcome.oom_killed


@pytest.mark.timeout(60)
async def test_memory_limit_covers_the_whole_process_tree(sandbox: Harness) -> None:
    # Four children of 48 MiB each: every one is under 128 MiB, the tree is not.
    ran = await sandbox.run(
        """
        import os, time
        kids = []
        for _ in range(4):
            pid = os.fork()
            if pid == 0:
                block = bytearray(48 * 1024 * 1024)
                time.sleep(5)
                os._exit(0)
            kids.append(pid)
        codes = [os.waitstatus_to_exitcode(os.waitpid(k, 0)[1]) for k in kids]
        print(codes)
        """,
        memory_mb=128,
    )
    assert ran.outcome.oom_killed
    assert "-9" in ran.stdout  # at least one child was SIGKILLed, the parent reported it


@pytest.mark.timeout(60)
async def test_small_programs_are_not_oom_killed(sandbox: Harness) -> None:
    ran = await sandbox.run("block = bytearray(32 * 1024 * 1024); print(len(block))")
    assert ran.outcome.exit_code == 0 and not ran.outcome.oom_killed
    assert ran.outcome.peak_memory_mb is not None and ran.outcome.peak_memory_mb >= 32


@pytest.mark.timeout(60)
async def test_memory_and_pids_limits_are_set_on_the_running_cgroup(sandbox: Harness) -> None:
    work = await sandbox.workspace(
        {"main.py": "import time\nprint('up', flush=True)\ntime.sleep(30)\n"}
    )
    marker = os.urandom(6).hex()
    spec = sandbox.spec(work, marker=marker, memory_mb=200, pids=42, cpu_shares=512)
    async with anyio.create_task_group() as tg:
        tg.start_soon(sandbox.backend.run, spec, CollectedOutput())
        pid = (await eventually(lambda: marker_pids(marker)))[0]
        values = {
            "memory": cgroup_file(pid, "memory", "memory.limit_in_bytes"),
            "memsw": cgroup_file(pid, "memory", "memory.memsw.limit_in_bytes"),
            "pids": cgroup_file(pid, "pids", "pids.max"),
            "shares": cgroup_file(pid, "cpu", "cpu.shares"),
        }
        tg.cancel_scope.cancel()
    assert values == {
        "memory": str(200 * MIB),
        "memsw": str(200 * MIB),  # swap included
        "pids": "42",
        "shares": "512",
    }


# --- processes ----------------------------------------------------------------------


@pytest.mark.timeout(60)
async def test_fork_bomb_stops_at_the_pids_limit(sandbox: Harness) -> None:
    ran = await sandbox.run(
        """
        import os, signal, time
        children = 0
        while True:
            try:
                pid = os.fork()
            except BlockingIOError:
                break
            if pid == 0:
                time.sleep(60)
                os._exit(0)
            children += 1
        print('forked', children, flush=True)
        os.killpg(0, signal.SIGKILL)
        """,
        pids=32,
    )
    forked = int(ran.stdout.split()[1])
    assert 20 <= forked < 32  # bwrap's init, this process and the children fit in 32
    await _hello_still_works(sandbox)


@pytest.mark.timeout(60)
async def test_exponential_fork_bomb_ends_at_the_timeout_and_leaves_nothing(
    sandbox: Harness,
) -> None:
    ran = await sandbox.run(
        """
        import os
        print('boom', flush=True)
        while True:
            try:
                os.fork()
            except OSError:
                pass
        """,
        pids=64,
        timeout_seconds=3,
    )
    assert ran.outcome.timed_out and ran.outcome.exit_code is None
    assert "boom" in ran.stdout
    assert ran.elapsed < 10
    await _hello_still_works(sandbox)  # and the harness found no survivor


# --- CPU ----------------------------------------------------------------------------


@pytest.mark.timeout(60)
async def test_cpu_time_is_reported(sandbox: Harness) -> None:
    ran = await sandbox.run(
        """
        import time
        end = time.process_time() + 0.5
        while time.process_time() < end:
            pass
        """
    )
    assert ran.outcome.cpu_ms is not None
    assert 450 <= ran.outcome.cpu_ms <= 2000
    quick = await sandbox.run("pass")  # a reused cgroup starts from zero
    assert quick.outcome.cpu_ms is not None and quick.outcome.cpu_ms < 300


# --- disk ---------------------------------------------------------------------------

FILL = """
import errno, os
written = 0
try:
    with open('{path}', 'wb') as f:
        while True:
            f.write(b'x' * 1024 * 1024)
            f.flush()
            written += 1
except OSError as exc:
    print(errno.errorcode[exc.errno], written)
"""


@pytest.mark.parametrize("path", ["/work/fill.bin", "/tmp/fill.bin"])
@pytest.mark.timeout(60)
async def test_disk_fill_gets_enospc_and_the_host_is_unaffected(
    sandbox: Harness, path: str
) -> None:
    host_free_before = shutil.disk_usage("/").free
    ran = await sandbox.run(FILL.format(path=path), disk_mb=32, memory_mb=256)
    code, written = ran.stdout.split()
    assert code == "ENOSPC", ran.stdout + ran.stderr
    assert 25 <= int(written) <= 32
    assert abs(shutil.disk_usage("/").free - host_free_before) < 16 * MIB
    usage = shutil.disk_usage(ran.workdir)
    assert usage.total == 32 * MIB and usage.free < 2 * MIB
    await _hello_still_works(sandbox)


@pytest.mark.timeout(60)
async def test_work_and_tmp_share_one_cap(sandbox: Harness) -> None:
    ran = await sandbox.run(
        "open('/work/a.bin', 'wb').write(b'x' * 20 * 1024 * 1024)\n"
        + FILL.format(path="/tmp/b.bin"),
        disk_mb=32,
    )
    code, written = ran.stdout.split()
    assert code == "ENOSPC" and 8 <= int(written) <= 12


@pytest.mark.timeout(60)
async def test_inode_exhaustion_gets_enospc(sandbox: Harness) -> None:
    ran = await sandbox.run(
        """
        import errno, os
        os.mkdir('/work/many')
        n = 0
        try:
            while True:
                open(f'/work/many/{n}', 'w').close()
                n += 1
        except OSError as exc:
            print(errno.errorcode[exc.errno], n)
        """,
        disk_mb=16,
    )
    code, created = ran.stdout.split()
    assert code == "ENOSPC", ran.stdout + ran.stderr
    # The inode cap: max(max_archive_entries + 4096, 64 per MiB) = 5096 here.
    assert 4000 <= int(created) <= 5096
    await _hello_still_works(sandbox)


@pytest.mark.timeout(60)
async def test_file_size_rlimit(sandbox: Harness) -> None:
    ran = await sandbox.run(FILL.format(path="/work/big.bin"), file_size_mb=4)
    assert ran.stdout.split() == ["EFBIG", "4"]


@pytest.mark.timeout(60)
async def test_dev_shm_is_small_and_capped(sandbox: Harness) -> None:
    ran = await sandbox.run(FILL.format(path="/dev/shm/fill.bin"), disk_mb=256, memory_mb=512)
    code, written = ran.stdout.split()
    assert code == "ENOSPC" and int(written) <= 64


# --- output -------------------------------------------------------------------------


class CountingSink:
    """Counts bytes, keeps none: the server's side of a flood."""

    def __init__(self) -> None:
        self.counts = {"stdout": 0, "stderr": 0}

    def write(self, stream: str, data: bytes) -> None:
        self.counts[stream] += len(data)


def _rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise LookupError("VmRSS")


@pytest.mark.timeout(120)
async def test_two_gib_output_flood_is_drained_with_flat_memory(sandbox: Harness) -> None:
    sink = CountingSink()
    peak = baseline = _rss_bytes()

    async def sample(scope: anyio.CancelScope) -> None:
        nonlocal peak
        while not scope.cancel_called:
            peak = max(peak, _rss_bytes())
            await anyio.sleep(0.05)

    async with anyio.create_task_group() as tg:
        tg.start_soon(sample, tg.cancel_scope)
        ran = await sandbox.run(
            """
            import os, sys
            chunk = b'y' * (1024 * 1024)
            for _ in range(2048):
                os.write(1, chunk)
            print('done', file=sys.stderr)
            """,
            sink=sink,
            timeout_seconds=100,
        )
        tg.cancel_scope.cancel()
    assert ran.outcome.exit_code == 0 and not ran.outcome.timed_out
    assert sink.counts == {"stdout": 2048 * MIB, "stderr": 5}
    assert peak - baseline < 48 * MIB, f"server RSS grew by {(peak - baseline) / MIB:.0f} MiB"


@pytest.mark.timeout(60)
async def test_output_beyond_the_cap_is_dropped_and_the_program_keeps_running(
    sandbox: Harness,
) -> None:
    capped = CollectedOutput(cap=1000)
    ran = await sandbox.run(
        """
        import sys
        for i in range(100000):
            print('line', i)
        print('finished', file=sys.stderr)
        """,
        sink=capped,
    )
    assert ran.outcome.exit_code == 0
    assert len(capped.chunks["stdout"]) == 1000
    assert capped.text("stdout").startswith("line 0\nline 1\n")
    assert capped.text("stderr") == "finished\n"


# --- rlimits ------------------------------------------------------------------------


@pytest.mark.timeout(60)
async def test_open_files_rlimit(sandbox: Harness) -> None:
    ran = await sandbox.run(
        """
        import errno, os, resource
        print(resource.getrlimit(resource.RLIMIT_NOFILE))
        fds = []
        try:
            while True:
                fds.append(os.open('/dev/null', os.O_RDONLY))
        except OSError as exc:
            print(errno.errorcode[exc.errno], len(fds))
        """,
        open_files=64,
    )
    limits, result = ran.stdout.splitlines()
    assert limits == "(64, 64)"
    code, opened = result.split()
    assert code == "EMFILE" and 55 <= int(opened) < 64


@pytest.mark.timeout(60)
async def test_core_dumps_are_off(sandbox: Harness) -> None:
    ran = await sandbox.run(
        """
        import os, resource, subprocess, sys
        print(resource.getrlimit(resource.RLIMIT_CORE))
        child = subprocess.run([sys.executable, '-c', 'import os; os.abort()'])
        print(child.returncode, sorted(os.listdir('/work')))
        """
    )
    assert ran.stdout.splitlines() == ["(0, 0)", "-6 ['main.py']"]
    assert sorted(os.listdir(ran.workdir)) == ["main.py"]
