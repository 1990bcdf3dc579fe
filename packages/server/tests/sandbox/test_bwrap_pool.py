"""Pre-started sandboxes: a run handed to one sees what a cold run sees, holds the
same limits (adjusted to its own), leaves nothing, and inherits nothing of before.

Runs go through the eval driver as the runner makes them (``run_driver``); pooled
ones wait until the pool has a sandbox ready, so each test really takes one.
"""

from __future__ import annotations

import json
import os
import signal
import time
from dataclasses import replace
from pathlib import Path

import anyio
import pytest
from bwrap_harness import (
    BASE_ENV,
    MARKER_VAR,
    Harness,
    cgroup_file,
    cgroup_paths,
    driver_spec,
    eventually,
    namespace_pids,
    pooled_workspace,
    run_driver,
    started_harness,
)
from python_executor_server.execution import driver
from python_executor_server.sandbox.base import CollectedOutput, Interpreter, RunSpec
from python_executor_server.sandbox.cgroups import v1_mounts
from python_executor_server.sandbox.mounts import mount_points_under
from python_executor_server.sandbox.pool import Entry
from python_executor_server.sandbox.workspace import POOL_PREFIX
from python_executor_server.settings import Settings
from test_bwrap_kill import DAEMON, SETSID_ESCAPEE

pytestmark = pytest.mark.sandbox
MIB = 1024 * 1024
MODES = [pytest.param(True, id="pooled"), pytest.param(False, id="cold")]


@pytest.fixture(params=[True, False], ids=["zygote", "bwrap-started"])
def sandbox_settings(sandbox_settings: Settings, request: pytest.FixtureRequest) -> Settings:
    """Every test twice: pooled sandboxes forked from the zygote (the default for runs
    without network) and started one by one by bwrap (network on, or no zygote)."""
    return sandbox_settings.model_copy(update={"pool_zygote": request.param})


PROBE = """
import json, os, resource, socket, stat, sys
fds = sorted(int(fd) for fd in os.listdir('/proc/self/fd'))
lines = open('/proc/self/status').read().splitlines()
status = dict(l.split(':\\t', 1) for l in lines if ':\\t' in l)
view = {
    'environ': dict(os.environ),
    'proc_environ': sorted(open('/proc/self/environ', 'rb').read().decode().split('\\0')[:-1]),
    'cmdline': open('/proc/self/cmdline', 'rb').read().decode().split('\\0')[-3:],
    'argv': sys.argv, 'orig_argv': sys.orig_argv[1:], 'path': sys.path,
    'modules': sorted(sys.modules), 'fds': fds,
    'stdin_fifo': stat.S_ISFIFO(os.fstat(0).st_mode),
    'streams': [(s.encoding, s.errors, s.line_buffering, s.write_through, s.isatty())
                for s in (sys.stdin, sys.stdout, sys.stderr)],
    'cwd': os.getcwd(), 'ids': [os.getuid(), os.getgid(), os.getgroups()],
    'umask': os.umask(0o22), 'flags': repr(sys.flags), 'fsenc': sys.getfilesystemencoding(),
    'rlimits': [resource.getrlimit(r) for r in (resource.RLIMIT_NOFILE, resource.RLIMIT_FSIZE,
                resource.RLIMIT_CORE, resource.RLIMIT_AS, resource.RLIMIT_NPROC)],
    'status': {k: status[k].strip() for k in ('Seccomp', 'NoNewPrivs', 'CapEff', 'CapBnd',
               'SigBlk', 'SigIgn', 'Uid', 'Gid')},
    'processes': sorted(int(p) for p in os.listdir('/proc') if p.isdigit()),
    'work': sorted(os.listdir('/work')), 'tmp': sorted(os.listdir('/tmp')),
    'hostname': socket.gethostname(), 'main': sorted(k for k in globals() if k != 'view'),
    'sched': os.sched_getscheduler(0), 'nice': os.nice(0),
}
print(json.dumps(view, sort_keys=True))
"""


@pytest.mark.timeout(90)
async def test_a_pooled_run_sees_exactly_what_a_cold_run_sees(sandbox: Harness) -> None:
    views = {}
    for pooled in (True, False):
        ran = await run_driver(sandbox, PROBE, pooled=pooled, env={"USER_VAR": "x=y"})
        assert ran.outcome.exit_code == 0, ran.stderr
        view = json.loads(ran.stdout)
        assert view["environ"].pop(MARKER_VAR) == ran.marker
        views[pooled] = view
    assert views[True] == views[False]
    view = views[True]
    path = f"{sandbox.interpreter.prefix}/bin:{BASE_ENV['PATH']}"
    assert view["environ"] == {**BASE_ENV, "PATH": path, "USER_VAR": "x=y", "PWD": "/work"}
    assert view["proc_environ"] == ["LANG=C.UTF-8", "PWD=/work"]  # what it was started with
    assert view["fds"] == [0, 1, 2, driver.RESULT_FD, view["fds"][-1]]  # + listdir's own
    assert view["work"] == ["main.py"] and view["tmp"] == []
    assert view["processes"] == [1, 2]  # bwrap's init and the program: nothing else
    assert view["stdin_fifo"]
    assert view["sched"] == os.SCHED_OTHER and view["nice"] == 0  # not the pool's SCHED_IDLE
    assert view["argv"] == ["/work/main.py"] and view["orig_argv"] == ["/work/main.py"]


@pytest.mark.timeout(90)
async def test_nothing_of_an_earlier_run_is_visible(sandbox: Harness) -> None:
    first = await run_driver(
        sandbox,
        "import os, subprocess\n"
        "open('/work/left.txt', 'w').write('secret')\n"
        "open('/tmp/left.txt', 'w').write('secret')\n"
        "os.environ['LEFT'] = 'secret'\n"
        "subprocess.Popen(['sleep', '600'], start_new_session=True)\n" + SETSID_ESCAPEE,
        pooled=True,
    )
    assert first.outcome.exit_code == 0, first.stderr
    for _ in range(3):  # the pool's other sandbox, then refills
        ran = await run_driver(sandbox, PROBE, pooled=True)
        view = json.loads(ran.stdout)
        assert view["work"] == ["main.py"] and view["tmp"] == []
        assert view["processes"] == [1, 2]
        assert "LEFT" not in view["environ"]


GETCPU = """
import ctypes, os
libc = ctypes.CDLL(None)
seen = []
for cpu in sorted(os.sched_getaffinity(0)) * 2:
    os.sched_setaffinity(0, {cpu})
    seen.append([cpu, libc.sched_getcpu()])
print(seen)
"""


@pytest.mark.parametrize("pooled", MODES)
@pytest.mark.timeout(60)
async def test_sched_getcpu_says_the_cpu_the_program_is_on(sandbox: Harness, pooled: bool) -> None:
    """glibc reads the CPU from the thread's rseq area, which the kernel keeps up to date
    once the area is registered. A fork of the zygote registers its own copy (the kernel
    dropped the zygote's registration for it); else sched_getcpu() says, ever after, the
    CPU the zygote was on when it forked."""
    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("one CPU: nothing to tell apart")
    ran = await run_driver(sandbox, GETCPU, pooled=pooled)
    assert ran.outcome.exit_code == 0, ran.stderr
    seen = json.loads(ran.stdout)
    assert len(seen) >= 4 and all(cpu == got for cpu, got in seen), seen


@pytest.mark.parametrize("pooled", MODES)
@pytest.mark.timeout(60)
async def test_driver_runs_hello_with_result_and_stdin(sandbox: Harness, pooled: bool) -> None:
    ran = await run_driver(
        sandbox,
        "import sys\nprint(sys.stdin.read().upper(), end='')\n6 * 7\n",
        pooled=pooled,
        stdin=b"fed\n",
        eval_last_expr=True,
        args=("a", ""),
    )
    assert ran.outcome.exit_code == 0, ran.stderr
    assert ran.stdout == "FED\n"
    assert driver.parse_report(ran.outcome.side_channel).result == "42"


@pytest.mark.parametrize("pooled", MODES)
@pytest.mark.timeout(60)
async def test_timeout_kills_everything_and_keeps_output(sandbox: Harness, pooled: bool) -> None:
    ran = await run_driver(
        sandbox,
        SETSID_ESCAPEE + DAEMON + "print('sleeping', flush=True)\ntime.sleep(600)\n",
        pooled=pooled,
        timeout_seconds=1,
    )
    assert ran.outcome.timed_out and ran.outcome.exit_code is None
    assert "sleeping" in ran.stdout
    assert 0.9 < ran.elapsed < 8


@pytest.mark.timeout(60)
async def test_the_timeout_starts_at_hand_off_not_when_the_sandbox_started(
    sandbox: Harness,
) -> None:
    spec = driver_spec(sandbox, marker="warm", timeout_seconds=1)
    assert await sandbox.backend.wait_warm(spec, count=2)
    await anyio.sleep(1.5)  # idle in the pool longer than the run may take
    ran = await run_driver(sandbox, "import time; time.sleep(0.3)", pooled=True, timeout_seconds=1)
    assert ran.outcome.exit_code == 0 and not ran.outcome.timed_out


@pytest.mark.timeout(60)
async def test_cancelling_a_pooled_run_leaves_nothing(sandbox: Harness) -> None:
    spec = driver_spec(sandbox, marker=os.urandom(6).hex(), timeout_seconds=120)
    work = await pooled_workspace(sandbox, spec)
    init = sandbox.backend._claimed[work].box.init
    assert init is not None
    namespace = os.stat(f"/proc/{init.pid}/ns/pid_for_children").st_ino  # the run's
    (work / "main.py").write_text(SETSID_ESCAPEE + DAEMON + "time.sleep(600)\n")
    out = CollectedOutput()
    async with anyio.create_task_group() as tg:
        tg.start_soon(sandbox.backend.run, replace(spec, workdir=work), out)
        await eventually(lambda: "daemonised" in out.text("stdout"))
        assert len(namespace_pids(namespace)) >= 4  # init, program, escapee, daemon
        cancelled_at = time.monotonic()
        tg.cancel_scope.cancel()
    assert time.monotonic() - cancelled_at < 1.0
    assert namespace_pids(namespace) == []


@pytest.mark.parametrize("pooled", MODES)
@pytest.mark.timeout(60)
async def test_memory_limit_of_the_request_holds(sandbox: Harness, pooled: bool) -> None:
    # The pool starts its sandboxes with the default memory limit; this run asks for less.
    ran = await run_driver(
        sandbox,
        """
        hog = []
        print('allocating', flush=True)
        while True:
            hog.append(bytearray(8 * 1024 * 1024))
        """,
        pooled=pooled,
        memory_mb=96,
    )
    assert ran.outcome.oom_killed and ran.stdout == "allocating\n"
    assert ran.outcome.peak_memory_mb is not None and ran.outcome.peak_memory_mb <= 96.5


@pytest.mark.timeout(60)
async def test_cgroup_limits_are_adjusted_at_hand_off(sandbox: Harness) -> None:
    memory = v1_mounts().get("memory")
    if memory is None:
        pytest.skip("reads v1 control files")
    spec = driver_spec(sandbox, marker="x", memory_mb=200, pids=42, cpu_shares=512)
    work = await pooled_workspace(sandbox, spec)
    init = sandbox.backend._claimed[work].box.init
    assert init is not None
    (work / "main.py").write_text("import time\nprint('up', flush=True)\ntime.sleep(30)\n")
    out = CollectedOutput()
    async with anyio.create_task_group() as tg:
        tg.start_soon(sandbox.backend.run, replace(spec, workdir=work), out)
        await eventually(lambda: "up" in out.text("stdout"))
        program = _first_child(init.pid)  # what the limits are for: the program
        values = {c: cgroup_file(program, c, f) for c, f in CONTROL_FILES.items()}
        # The init is in the same cgroup (a zygote's fork's joins it right after its fork).
        await eventually(lambda: _slot_of(init.pid) == _slot_of(program))
        tg.cancel_scope.cancel()
    assert values == {
        "memory": str(200 * MIB),
        "pids": "42",
        "cpu": "512",  # not the pool's warming weight
    }


CONTROL_FILES = {"memory": "memory.limit_in_bytes", "pids": "pids.max", "cpu": "cpu.shares"}


def _slot_of(pid: int) -> dict[str, str]:
    return {c: path for c, path in cgroup_paths(pid).items() if c in CONTROL_FILES}


def _first_child(pid: int) -> int:
    return int(Path(f"/proc/{pid}/task/{pid}/children").read_text().split()[0])


@pytest.mark.timeout(60)
async def test_cpu_time_is_the_runs_own(sandbox: Harness) -> None:
    ran = await run_driver(sandbox, "pass", pooled=True)
    assert ran.outcome.cpu_ms is not None and ran.outcome.cpu_ms < 300


@pytest.mark.parametrize("pooled", MODES)
@pytest.mark.timeout(60)
async def test_disk_cap_and_fork_bomb(sandbox: Harness, pooled: bool) -> None:
    ran = await run_driver(
        sandbox,
        """
        import errno, os
        try:
            with open('/tmp/fill', 'wb') as f:
                while True:
                    f.write(b'x' * 1024 * 1024); f.flush()
        except OSError as exc:
            print(errno.errorcode[exc.errno])
        os.remove('/tmp/fill')
        n = 0
        while True:
            try:
                if os.fork() == 0:
                    import time; time.sleep(60); os._exit(0)
            except BlockingIOError:
                break
            n += 1
        print(n < 32)
        """,
        pooled=pooled,
        pids=32,
    )
    assert ran.stdout.split() == ["ENOSPC", "True"], ran.stderr


async def _kill_idle(sandbox: Harness, spec: RunSpec, count: int | None = None) -> list[Entry]:
    """Warm ``spec``'s key (2 ready), then kill the init of ``count`` of its idle
    sandboxes (all: None), as the OOM killer or an operator would; those, once dead."""
    assert await sandbox.backend.wait_warm(spec, count=2)
    pool = sandbox.backend._pool
    assert pool is not None
    killed = [e for s in pool._keys.values() for e in s.idle][:count]
    for entry in killed:
        assert entry.box.init is not None
        os.kill(entry.box.init.pid, signal.SIGKILL)
    await eventually(lambda: all(not e.box.alive() for e in killed))
    return killed


@pytest.mark.timeout(60)
async def test_a_dead_pooled_sandbox_is_skipped(sandbox: Harness) -> None:
    spec = driver_spec(sandbox, marker="x")
    dead = {e.workdir for e in await _kill_idle(sandbox, spec)}
    work = await sandbox.backend.create_workspace(spec.execution_id, 64, spec)
    sandbox.workspaces.append(work)
    assert work not in dead
    if sandbox.settings.pool_zygote:  # forked at once from the zygote, which lives on
        assert work in sandbox.backend._claimed
    else:  # cold, at once
        assert work not in sandbox.backend._claimed
    (work / "main.py").write_text("print('served')")
    out = CollectedOutput()
    outcome = await sandbox.backend.run(replace(spec, workdir=work), out)
    assert outcome.exit_code == 0 and out.text("stdout") == "served\n"


@pytest.mark.timeout(60)
async def test_a_dead_idle_sandbox_is_replaced(sandbox: Harness) -> None:
    spec = driver_spec(sandbox, marker="x")
    [victim] = await _kill_idle(sandbox, spec, count=1)
    assert await sandbox.backend.wait_warm(spec, count=2)  # a refill replaced it
    pool = sandbox.backend._pool
    assert pool is not None
    assert all(victim is not e for s in pool._keys.values() for e in s.idle)


@pytest.mark.timeout(60)
async def test_an_empty_pool_never_makes_a_run_wait(
    sandbox_settings: Settings, interpreter: Interpreter
) -> None:
    settings = sandbox_settings.model_copy(update={"pool_size": 1})
    async with started_harness(settings, interpreter) as harness:
        spec = driver_spec(harness, marker="x")
        assert await harness.backend.wait_warm(spec)
        taken = await harness.backend.create_workspace(spec.execution_id, 64, spec)
        harness.workspaces.append(taken)
        assert taken in harness.backend._claimed
        started = time.monotonic()
        second = await harness.backend.create_workspace("exe_second", 64, spec)
        harness.workspaces.append(second)
        if settings.pool_zygote:  # a fork made for it at once: cheaper than a cold start
            assert second in harness.backend._claimed
        else:  # cold
            assert second not in harness.backend._claimed
        assert time.monotonic() - started < 1


@pytest.mark.timeout(60)
async def test_runs_the_pool_cannot_serve_go_cold(sandbox: Harness) -> None:
    # With the zygote up, another workspace size is a fork of it (the size is set per
    # fork); what the zygote fixes (open files) or cannot do (network) goes cold.
    forked = {"disk_mb": 32} if sandbox.settings.pool_zygote else None
    for options in ({"disk_mb": 32}, {"network": True}, {"open_files": 64}):
        spec = driver_spec(sandbox, marker="x", **options)
        assert await sandbox.backend.wait_warm(driver_spec(sandbox, marker="x"))
        work = await sandbox.backend.create_workspace(spec.execution_id, spec.limits.disk_mb, spec)
        sandbox.workspaces.append(work)
        assert (work in sandbox.backend._claimed) == (options == forked), options
        assert os.statvfs(work).f_blocks * os.statvfs(work).f_frsize == spec.limits.disk_mb << 20


@pytest.mark.timeout(60)
async def test_a_sandbox_handed_out_but_never_run_is_replaced(sandbox: Harness) -> None:
    # (A run that failed before it started: its workspace is removed unused.) Taken while
    # still starting, too: the pool would otherwise stay one short until it runs dry.
    settings = sandbox.settings
    size = settings.pool_zygote_size if settings.pool_zygote else settings.pool_size
    spec = driver_spec(sandbox, marker="x")
    pool = sandbox.backend._pool
    assert pool is not None
    for wait_ready in (True, False):
        if wait_ready:
            assert await sandbox.backend.wait_warm(spec, count=size)
        work = await sandbox.backend.create_workspace(spec.execution_id, 64, spec)
        key = sandbox.backend._claimed[work].key
        await sandbox.backend.remove_workspace(work)
        await eventually(lambda k=key: pool.ready(k) == size)  # (not wait_warm: it refills)


@pytest.mark.timeout(60)
async def test_a_taken_sandbox_is_replaced_while_its_run_runs_when_forked(
    sandbox: Harness,
) -> None:
    # A fork's replacement starts with the run, not after its answer, where it would hold
    # up the client's next request; one started by bwrap, which costs a run tens of
    # milliseconds of CPU, once the run is over (docs/benchmarks.md).
    settings = sandbox.settings
    size = settings.pool_zygote_size if settings.pool_zygote else settings.pool_size
    spec = driver_spec(sandbox, marker="x")
    assert await sandbox.backend.wait_warm(spec, count=size)
    pool = sandbox.backend._pool
    assert pool is not None
    key = next(iter(pool._keys))
    ran: list[Path] = []
    async with anyio.create_task_group() as tg:
        ended = anyio.Event()

        async def long_run() -> None:
            ran.append(
                (await run_driver(sandbox, "import time; time.sleep(3)", pooled=True)).workdir
            )
            ended.set()

        tg.start_soon(long_run)
        await eventually(lambda: pool.hits >= 1)  # taken
        if settings.pool_zygote:
            await eventually(lambda: pool.ready(key) == size, within=2.5)
            assert not ended.is_set()
        else:
            await anyio.sleep(1.5)  # (a bwrap-started one is ready within a second here)
            assert pool.ready(key) == size - 1 and not ended.is_set()
    await sandbox.backend.remove_workspace(ran[0])  # (as the runner does after the answer)
    sandbox.workspaces.remove(ran[0])
    await eventually(lambda: pool.ready(key) == size)


@pytest.mark.timeout(60)
async def test_the_pool_refills_and_describes_itself(sandbox: Harness) -> None:
    for _ in range(3):
        await run_driver(sandbox, "pass", pooled=True)
    settings = sandbox.settings
    size = settings.pool_zygote_size if settings.pool_zygote else settings.pool_size
    spec = driver_spec(sandbox, marker="x")
    assert await sandbox.backend.wait_warm(spec, count=size)
    pool = sandbox.backend.describe()["pool"]
    assert pool["size"] == 2 and pool["hits"] >= 3
    (key,) = pool["keys"]
    assert key == {
        "python": sandbox.interpreter.version,
        "network": False,
        "disk_mb": 64,
        "idle": size,
        "ready": size,
        "starting": 0,
        "size": size,
    }


@pytest.mark.timeout(60)
async def test_close_destroys_the_pool(
    sandbox_settings: Settings, interpreter: Interpreter
) -> None:
    async with started_harness(sandbox_settings, interpreter) as harness:
        spec = driver_spec(harness, marker="x")
        assert await harness.backend.wait_warm(spec, count=2)
        pool = harness.backend._pool
        assert pool is not None
        inits = [e.box.init.pid for s in pool._keys.values() for e in s.idle if e.box.init]
        namespaces = [os.stat(f"/proc/{pid}/ns/pid").st_ino for pid in inits]
        instance = harness.backend._instance
    assert all(namespace_pids(ns) == [] for ns in namespaces)
    assert mount_points_under(sandbox_settings.runs_path) == []
    assert not list(sandbox_settings.runs_path.glob(POOL_PREFIX + "*"))
    for point in v1_mounts().values():
        assert not (point / sandbox_settings.cgroup_root / instance).exists()


@pytest.mark.timeout(60)
async def test_start_reaps_pooled_workspaces_of_a_dead_server(
    sandbox_settings: Settings, interpreter: Interpreter
) -> None:
    dead = 4_000_000
    while os.path.exists(f"/proc/{dead}"):  # noqa: ASYNC240 - /proc, instant
        dead += 1
    stale = sandbox_settings.runs_path / f"{POOL_PREFIX}{dead}-deadbeef-1"
    alive = sandbox_settings.runs_path / f"{POOL_PREFIX}{os.getpid()}-cafe-1"
    for root in (stale, alive):
        (root / "work").mkdir(parents=True)
    from python_executor_server.sandbox.mounts import mount, unmount

    mount("tmpfs", stale, "tmpfs", 0, "size=1m")
    try:
        async with started_harness(sandbox_settings, interpreter):
            assert not stale.exists()
            assert alive.exists()  # ours (this pid is alive): not touched
    finally:
        unmount(stale)
        (alive / "work").rmdir()
        alive.rmdir()
