"""The ``SandboxBackend`` contract: every backend, the same programs, the same promises.

Each test runs against every backend (``box`` in ``sandbox_backends.py``:
bwrap cold, bwrap from its pool of pre-started sandboxes, and docker, all
started for real), taking the runner's steps and running the command it builds:
the eval driver (``driver_argv``) with its report pipe at ``RESULT_FD`` and
the runner's environment. After every run ``Box.run`` asserts that no process
of it is left on the host (and, on docker, no container). Where the backends
document different promises (the disk cap, added environment variables) the
test asserts what each one documents.

The backend-specific suites (``tests/sandbox/``) go deeper into each
mechanism; this one keeps the backends interchangeable.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest
from python_executor_server.execution import driver
from python_executor_server.sandbox.base import SANDBOX_GID, SANDBOX_UID, Mount
from sandbox_backends import (
    DISK_CAP_SHARED,
    ENV_ADDITIONS,
    MIB,
    Box,
    CountingSink,
    box_fixture,  # noqa: F401 - the fixture "box"
    bridge_gateway,
    contract_interpreter_fixture,  # noqa: F401 - the fixture box needs
    eventually,
)

HELLO = "print('hello from the sandbox')"
ENV_DUMP = "import json, os\nprint(json.dumps(dict(os.environ)))\n"
IDENTITY = """
import os
lines = open('/proc/self/status').read().splitlines()
status = dict(line.split(':\\t', 1) for line in lines if ':\\t' in line)
print(os.getuid(), os.geteuid(), os.getgid(), os.getegid(), set(os.getgroups()) <= {1000})
print(os.getcwd(), status['CapEff'], status['NoNewPrivs'])
"""
STDIN_DIGEST = """
import hashlib, sys
data = sys.stdin.buffer.read()
print(len(data), hashlib.sha256(data).hexdigest(), repr(sys.stdin.buffer.read()))
"""
IGNORES_STDIN = "print('ignoring stdin')"
EVAL_LAST = """
x = 6
print('out')
print('{"result": "forged", "error_type": "Forged"}')
x * 7
"""
PRE_AND_ARGS = """
import sys
print(sys.argv[1:])
print(open('made-by-pre.txt').read().strip())
"""
SLEEPER_WITH_ESCAPEE = """
import os, time
if os.fork() == 0:
    os.setsid()  # its own session: a kill of the process group would miss it
    time.sleep(600)
    os._exit(0)
print('started', flush=True)
time.sleep(600)
print('never')
"""
MEMORY_BOMB = """
hog = []
print('allocating', flush=True)
while True:
    hog.append(bytearray(8 * 1024 * 1024))  # zero-filled: really touched
"""
FORK_UNTIL_REFUSED = """
import os, time
children = 0
while children < 1000:
    try:
        pid = os.fork()
    except BlockingIOError:
        break
    if pid == 0:
        time.sleep(600)
        os._exit(0)
    children += 1
print('forked', children, flush=True)
"""
FORK_BOMB = """
import os
print('boom', flush=True)
while True:
    try:
        os.fork()
    except OSError:
        pass
"""
FILL = """
import errno
written = 0
try:
    with open('{path}', 'wb') as f:
        while written < 1024:
            f.write(b'x' * 1024 * 1024)
            f.flush()
            written += 1
    print('NO LIMIT', written)
except OSError as exc:
    print(errno.errorcode[exc.errno], written)
"""
WRITE_SYSTEM = """
import errno, os, sys
here = os.path.dirname(os.path.realpath(sys.executable))
for path in ('/usr/evil', '/usr/lib/evil', '/evil', here + '/evil'):
    try:
        open(path, 'w').close()
        print('WROTE', path)
    except OSError as exc:
        print(errno.errorcode[exc.errno])
print(os.path.exists('/usr/evil'))
"""
FLOOD = """
import os, sys
chunk = b'y' * (1024 * 1024)
for _ in range({mib}):
    os.write(1, chunk)
print('done', file=sys.stderr)
"""
PROBE = """
import socket, sys
for target in sys.argv[1:]:
    host, port = target.rsplit(':', 1)
    try:
        socket.create_connection((host, int(port)), timeout=3).close()
        print('CONNECTED', target)
    except OSError as exc:
        print('refused', type(exc).__name__)
lines = open('/proc/net/dev').read().splitlines()[2:]
print('interfaces', sorted(line.split(':')[0].strip() for line in lines))
"""
PROJECT = {
    "data/input.txt": "from the project\n",
    "pkg/__init__.py": "",
    "pkg/mod.py": "def twice(x):\n    return 2 * x\n",
}
USES_PROJECT = """
import os
from pkg.mod import twice
print(twice(21))
print(open('data/input.txt').read().strip())
with open('/work/data/new.txt', 'w') as f:
    f.write('written inside')
os.mkdir('/work/made')
with open('/tmp/scratch', 'w') as f:
    f.write('tmp ok')
print(open('/work/data/new.txt').read(), open('/tmp/scratch').read())
print(sorted(os.listdir('/work')), os.stat('/work/main.py').st_uid)
"""
SELF_KILL = """
import os, signal
print('dying', flush=True)
os.kill(os.getpid(), signal.SIGTERM)
"""
USES_MOUNTS = """
import errno
import lib  # /opt/ro is on sys.path: the driver's --path, as for requirement environments
print(lib.VALUE)
try:
    open('/opt/ro/x', 'w').close()
    print('WROTE')
except OSError as exc:
    print(errno.errorcode[exc.errno])
with open('/opt/rw/out.txt', 'w') as f:
    f.write('written inside')
"""
REFUSED = {"EROFS", "EACCES", "EPERM"}
# RunOutcome.exit_code of a program killed by signal N: docker reports -N
# (docs/docker.md, like subprocess), bwrap 128+N (bwrap's own exit status, asserted
# as 137 in tests/sandbox/test_bwrap_limits.py); base.py does not say which. Over
# HTTP the same program gets exit_code -15 on one backend and 143 on the other.


async def _still_works(box: Box) -> None:
    ran = await box.run(HELLO)
    assert (ran.outcome.exit_code, ran.stdout) == (0, "hello from the sandbox\n"), ran.explain


# --- running a program ----------------------------------------------------------------


@pytest.mark.timeout(60)
async def test_hello_world(box: Box) -> None:
    ran = await box.run(HELLO)
    assert ran.outcome.exit_code == 0, ran.explain
    assert (ran.stdout, ran.stderr) == ("hello from the sandbox\n", "")
    assert ran.outcome.error is None
    assert not ran.outcome.timed_out and not ran.outcome.oom_killed
    assert ran.report == driver.DriverReport()  # the driver reported: no result, no error


@pytest.mark.timeout(60)
async def test_environment_is_exactly_the_spec(box: Box) -> None:
    ran = await box.run(ENV_DUMP, env={"USER_VAR": "x y=z", "EMPTY": ""})
    env = json.loads(ran.stdout)
    assert env == {**ran.spec.env, **ENV_ADDITIONS[box.kind]}
    assert env["USER_VAR"] == "x y=z" and env["EMPTY"] == ""


@pytest.mark.timeout(60)
async def test_runs_as_1000_without_capabilities(box: Box) -> None:
    ran = await box.run(IDENTITY)
    ids, rest = ran.lines(2)
    assert ids == f"{SANDBOX_UID} {SANDBOX_UID} {SANDBOX_GID} {SANDBOX_GID} True", ids
    assert rest == "/work 0000000000000000 1", ran.explain


@pytest.mark.timeout(60)
async def test_stdin_is_fed_then_eof(box: Box) -> None:
    data = b"".join(b"line %d\n" % i for i in range(200_000))  # ~1.5 MiB: > a pipe's buffer
    ran = await box.run(STDIN_DIGEST, stdin=data)
    assert ran.stdout == f"{len(data)} {hashlib.sha256(data).hexdigest()} b''\n", ran.explain


@pytest.mark.timeout(60)
async def test_no_stdin_is_immediate_eof(box: Box) -> None:
    ran = await box.run(STDIN_DIGEST)
    assert ran.stdout.startswith("0 ") and ran.stdout.endswith(" b''\n"), ran.explain


@pytest.mark.timeout(60)
async def test_stdin_never_read_does_not_hang(box: Box) -> None:
    ran = await box.run(IGNORES_STDIN, stdin=b"z" * (8 * MIB))
    assert (ran.outcome.exit_code, ran.stdout) == (0, "ignoring stdin\n"), ran.explain
    assert not ran.outcome.timed_out and ran.elapsed < 15


@pytest.mark.parametrize(
    ("code", "exit_code", "error"),
    [
        ("pass", 0, (None, None)),
        ("import sys\nsys.exit(3)", 3, (None, None)),
        ("x = 1\nraise ValueError('bad')", 1, ("ValueError", 2)),
    ],
    ids=["zero", "three", "exception"],
)
@pytest.mark.timeout(60)
async def test_exit_codes(
    box: Box, code: str, exit_code: int, error: tuple[str | None, int | None]
) -> None:
    ran = await box.run(code)
    assert ran.outcome.exit_code == exit_code, ran.explain
    assert (ran.report.error_type, ran.report.error_line) == error
    assert ran.outcome.error is None and not ran.outcome.timed_out


@pytest.mark.timeout(60)
async def test_death_by_a_signal_is_128_plus_the_signal(box: Box) -> None:
    ran = await box.run(SELF_KILL)
    assert ran.stdout == "dying\n" and not ran.outcome.oom_killed
    assert ran.outcome.exit_code == 128 + signal.SIGTERM, ran.outcome


@pytest.mark.timeout(60)
async def test_result_comes_back_through_the_side_channel(box: Box) -> None:
    ran = await box.run(EVAL_LAST, eval_last_expr=True)
    assert ran.outcome.exit_code == 0, ran.explain
    assert ran.report.result == "42" and ran.report.error_type is None
    assert ran.stdout == 'out\n{"result": "forged", "error_type": "Forged"}\n'  # not parsed


@pytest.mark.timeout(60)
async def test_pre_commands_and_args(box: Box) -> None:
    ran = await box.run(
        PRE_AND_ARGS,
        pre_commands=["echo pre-one", "echo made > made-by-pre.txt"],
        args=["--flag", "with space"],
    )
    assert ran.stdout == "pre-one\n['--flag', 'with space']\nmade\n", ran.explain
    failed = await box.run(HELLO, pre_commands=["echo before", "exit 7", "echo never"])
    assert (failed.outcome.exit_code, failed.stdout) == (7, "before\n")
    assert failed.report.pre_command_failed == 1


# --- time, cancellation -----------------------------------------------------------------


@pytest.mark.timeout(60)
async def test_timeout_kills_everything_and_keeps_partial_output(box: Box) -> None:
    ran = await box.run(SLEEPER_WITH_ESCAPEE, timeout_seconds=2)
    assert ran.outcome.timed_out and ran.outcome.exit_code is None
    assert ran.stdout == "started\n"
    assert 2 <= ran.elapsed < 8, ran.elapsed
    await _still_works(box)  # and Box.run found no process of it left


@pytest.mark.timeout(60)
async def test_cancellation_kills_within_a_second(box: Box) -> None:
    spec = await box.prepare(SLEEPER_WITH_ESCAPEE, timeout_seconds=120)
    sink = CountingSink()
    cancelled_at = 0.0
    async with anyio.create_task_group() as tg:
        tg.start_soon(box.backend.run, spec, sink)
        await eventually(lambda: "started" in sink.text("stdout"))
        assert len(box.pids(spec)) >= 2  # the program and its escapee: the scan sees them
        cancelled_at = time.monotonic()
        tg.cancel_scope.cancel()
    took = time.monotonic() - cancelled_at
    assert took < 1.0, f"cancellation took {took:.2f} s"
    await box.assert_nothing_left(spec)


# --- limits ------------------------------------------------------------------------


@pytest.mark.timeout(60)
async def test_memory_bomb_is_oom_killed(box: Box) -> None:
    ran = await box.run(MEMORY_BOMB, memory_mb=64)
    assert ran.outcome.oom_killed, ran.explain
    assert not ran.outcome.timed_out and ran.outcome.error is None
    assert ran.outcome.exit_code != 0
    assert ran.stdout == "allocating\n"  # output before the kill is kept
    await _still_works(box)


@pytest.mark.timeout(60)
async def test_forks_stop_at_the_pids_limit(box: Box) -> None:
    ran = await box.run(FORK_UNTIL_REFUSED, pids=32)
    word, forked = ran.fields(2)
    assert word == "forked" and 10 <= int(forked) < 32, ran.explain
    assert ran.outcome.exit_code == 0, ran.explain  # the sleeping children went with the run


@pytest.mark.timeout(60)
async def test_fork_bomb_is_stopped(box: Box) -> None:
    ran = await box.run(FORK_BOMB, pids=64, timeout_seconds=3)
    assert ran.outcome.timed_out and ran.outcome.exit_code is None
    assert "boom" in ran.stdout and ran.elapsed < 15
    await _still_works(box)


@pytest.mark.parametrize("where", ["/work", "/tmp"])
@pytest.mark.timeout(60)
async def test_disk_fill_gets_enospc(box: Box, where: str) -> None:
    ran = await box.run(FILL.format(path=f"{where}/fill.bin"), disk_mb=16, memory_mb=256)
    code, written = ran.fields(2)
    assert code == "ENOSPC", ran.explain
    assert 10 <= int(written) <= 16
    await _still_works(box)


@pytest.mark.timeout(60)
async def test_disk_cap_of_work_and_tmp_as_documented(box: Box) -> None:
    """bwrap: one cap over /work and /tmp together; docker: one cap each."""
    ran = await box.run(
        "open('/work/first.bin', 'wb').write(b'x' * 12 * 1024 * 1024)\n"
        + FILL.format(path="/tmp/second.bin"),
        disk_mb=16,
        memory_mb=256,
    )
    code, written = ran.fields(2)
    assert code == "ENOSPC", ran.explain
    if DISK_CAP_SHARED[box.kind]:
        assert int(written) <= 4
    else:
        assert 10 <= int(written) <= 16


@pytest.mark.timeout(60)
async def test_system_directories_are_read_only(box: Box) -> None:
    ran = await box.run(WRITE_SYSTEM)
    lines = ran.lines(5)
    assert set(lines[:4]) <= REFUSED and lines[4] == "False", ran.explain


@pytest.mark.timeout(90)
async def test_output_flood_beyond_the_cap_is_drained(box: Box) -> None:
    sink = CountingSink(cap=1 * MIB)
    ran = await box.run(FLOOD.format(mib=64), sink=sink, output_cap_bytes=1 * MIB)
    assert ran.outcome.exit_code == 0 and not ran.outcome.timed_out, ran.outcome
    # Every byte reaches the sink (it caps, and sees that it did); the program finished.
    assert sink.counts == {"stdout": 64 * MIB, "stderr": 5}
    assert len(sink.kept.chunks["stdout"]) == 1 * MIB and ran.stderr == "done\n"


# --- network -----------------------------------------------------------------------


@pytest.fixture()
def host_listeners() -> Iterator[list[tuple[str, socket.socket]]]:
    """Listeners on this host's own addresses: loopback and the Docker bridge gateway."""
    addresses = ["127.0.0.1"] + [a for a in [bridge_gateway()] if a]
    listeners = []
    for address in addresses:
        listener = socket.socket()
        listener.bind((address, 0))
        listener.listen(8)
        listener.setblocking(False)
        listeners.append((f"{address}:{listener.getsockname()[1]}", listener))
    yield listeners
    for _, listener in listeners:
        listener.close()


@pytest.mark.timeout(60)
async def test_network_off_reaches_no_host_listener(
    box: Box, host_listeners: list[tuple[str, socket.socket]]
) -> None:
    ran = await box.run(PROBE, args=[target for target, _ in host_listeners])
    lines = ran.lines(len(host_listeners) + 1)
    assert ran.outcome.exit_code == 0, ran.explain
    assert all(line.startswith("refused ") for line in lines[:-1]), lines
    assert lines[-1] == "interfaces ['lo']"  # an empty network namespace
    for _target, listener in host_listeners:
        with pytest.raises(BlockingIOError):
            listener.accept()  # nobody knocked


# --- workspaces, describe ------------------------------------------------------------------


@pytest.mark.timeout(60)
async def test_workspace_files_at_work_and_writable(box: Box) -> None:
    ran = await box.run(USES_PROJECT, files=PROJECT)
    assert ran.outcome.exit_code == 0, ran.explain
    assert ran.stdout == (
        "42\nfrom the project\nwritten inside tmp ok\n"
        f"['data', 'made', 'main.py', 'pkg'] {SANDBOX_UID}\n"
    )


@pytest.mark.timeout(60)
async def test_extra_mounts_read_only_and_writable(box: Box, tmp_path: Path) -> None:
    ro, rw = tmp_path / "ro", tmp_path / "rw"
    ro.mkdir()
    rw.mkdir()
    (ro / "lib.py").write_text("VALUE = 42\n")
    os.chown(rw, SANDBOX_UID, SANDBOX_GID)
    mounts = (Mount(ro, "/opt/ro"), Mount(rw, "/opt/rw", writable=True))
    ran = await box.run(USES_MOUNTS, mounts=mounts)
    value, refused = ran.fields(2)
    assert value == "42" and refused in REFUSED and not (ro / "x").exists(), ran.explain
    assert ran.outcome.exit_code == 0, ran.explain
    assert (rw / "out.txt").read_text() == "written inside"


@pytest.mark.timeout(60)
async def test_workspace_lifecycle(box: Box) -> None:
    path = await box.backend.create_workspace("exe_contract_lifecycle", 16)
    assert path.is_dir() and list(path.iterdir()) == []
    (path / "left.txt").write_text("x")
    await box.backend.remove_workspace(path)
    await box.backend.remove_workspace(path)  # idempotent
    assert not path.exists()


@pytest.mark.timeout(60)
async def test_describe_has_what_health_shows(box: Box) -> None:
    info = box.backend.describe()
    assert json.loads(json.dumps(info)) == info  # /health serialises it as it is
    assert info["backend"] == box.backend.name == box.kind
    assert "seccomp" in info
