"""Pooled sandboxes forked from a zygote (sandbox/zygote.py), attacked from inside.

With the defaults (root, cgroups, seccomp) every pooled run without network is a fork
of its key's zygote. These programs try what a fork could do that a bwrap-started
sandbox could not: reach the zygote or a concurrent run, keep privileges, make
namespaces or mounts, see the host's or the zygote's /proc, read the init's memory.
Every run also passes the harness's checks: nothing of it is left, on the host or in
its pid namespace. The contract suite and test_bwrap_pool.py run the rest of the
behaviour (limits, timeouts, output, what a run sees) over the same path.
"""

from __future__ import annotations

import array
import json
import os
import re
import resource
import shutil
import signal
import socket
from dataclasses import replace
from pathlib import Path

import anyio
import pytest
from bwrap_harness import (
    Harness,
    driver_spec,
    eventually,
    pooled_workspace,
    run_driver,
    started_harness,
)
from python_executor_server.sandbox import native
from python_executor_server.sandbox.base import CollectedOutput, Interpreter
from python_executor_server.sandbox.workspace import DETACHED_PREFIX
from python_executor_server.sandbox.zygote import Zygote
from python_executor_server.settings import Settings
from test_seccomp import PROBE_PROGRAM, PROBES

pytestmark = pytest.mark.sandbox


def zygote_made(harness: Harness) -> int:
    described = harness.backend.describe()["zygote"]
    assert described is not None, "the zygote is off"
    return int(described["made"])


def the_zygote(harness: Harness) -> int:
    """Host pid of the (one) zygote process: bwrap's init's child."""
    init = the_zygote_record(harness).box.init
    assert init is not None
    (pid,) = children(init.pid)
    return pid


@pytest.mark.timeout(60)
async def test_pooled_runs_are_forked_from_the_zygote(sandbox: Harness) -> None:
    code = """
        import os
        print(os.getpid(), os.getppid(), os.getuid(), os.getcwd(), sorted(os.listdir('/work')))
    """
    ran = await run_driver(sandbox, code, pooled=True)
    assert ran.outcome.exit_code == 0, ran.stderr
    assert ran.stdout == "2 1 1000 /work ['main.py']\n"  # pid 2 under its init, as bwrap's
    assert str(ran.workdir).startswith(DETACHED_PREFIX)
    assert zygote_made(sandbox) >= 1


@pytest.mark.timeout(60)
async def test_a_forked_run_has_no_privilege_and_the_filter(sandbox: Harness) -> None:
    code = """
        import ctypes, errno, json, os
        libc = ctypes.CDLL(None, use_errno=True)
        status = dict(l.split(':\\t', 1) for l in open('/proc/self/status').read().splitlines())
        def err(r):
            return 'ok' if r == 0 else errno.errorcode[ctypes.get_errno()]
        print(json.dumps({
            'caps': [status[k].strip() for k in ('CapInh', 'CapPrm', 'CapEff', 'CapBnd', 'CapAmb')],
            'nnp': status['NoNewPrivs'].strip(), 'seccomp': status['Seccomp'].strip(),
            'unshare_user': err(libc.unshare(0x10000000)),
            'unshare_mount': err(libc.unshare(0x00020000)),
            'mount_tmpfs': err(libc.mount(b'x', b'/tmp', b'tmpfs', 0, None)),
            'umount_proc': err(libc.umount2(b'/proc', 2)),
            'setns': err(libc.setns(os.open('/proc/self/ns/mnt', os.O_RDONLY), 0)),
        }))
    """
    ran = await run_driver(sandbox, code, pooled=True)
    assert ran.outcome.exit_code == 0, ran.stderr
    view = json.loads(ran.stdout)
    assert view["caps"] == ["0000000000000000"] * 5
    assert (view["nnp"], view["seccomp"]) == ("1", "2")
    for call in ("unshare_user", "unshare_mount", "mount_tmpfs", "umount_proc", "setns"):
        assert view[call] == "EPERM", (call, view)


@pytest.mark.timeout(120)
async def test_every_hostile_syscall_is_refused_in_a_forked_run(sandbox: Harness) -> None:
    """The seccomp suite's probes (test_seccomp.py), in a fork of the zygote: the filter
    each run installs itself is the one bwrap installs."""
    arg = json.dumps({name: [nr, args] for name, (nr, args, _) in PROBES.items()})
    ran = await run_driver(sandbox, PROBE_PROGRAM, pooled=True, args=(arg,))
    assert ran.outcome.exit_code == 0, ran.stderr
    results = json.loads(ran.stdout.strip().splitlines()[-1])
    refused = {name: results[name] for name in PROBES}
    assert refused == {name: expected for name, (_, _, expected) in PROBES.items()}


@pytest.mark.timeout(60)
async def test_the_init_and_the_zygote_are_out_of_reach(sandbox: Harness) -> None:
    """The run's init (pid 1) shares the zygote's memory: nothing of the run may read or
    write it, stop it or kill it. Every way in is tried: its /proc files, ptrace,
    process_vm_readv/writev, every signal."""
    code = """
        import ctypes, json, os, signal, time
        libc = ctypes.CDLL(None, use_errno=True)
        def attempt(path, mode='rb'):
            try:
                with open(path, mode) as f:
                    return 'read %d bytes' % len(f.read(64)) if 'r' in mode else f.write(b'x')
            except OSError as exc:
                return type(exc).__name__
        def call(*args):
            libc.syscall.restype = ctypes.c_long
            result = libc.syscall(*[ctypes.c_long(a) for a in args])
            return result if result >= 0 else os.strerror(ctypes.get_errno())
        buf = ctypes.create_string_buffer(64)
        iov = (ctypes.c_void_p * 2)(ctypes.addressof(buf), 64)
        maps_line = attempt('/proc/1/maps')
        signals = {}
        for sig in range(1, 65):
            if sig in (signal.SIGKILL, signal.SIGSTOP) or 32 <= sig < 35:
                continue
            try:
                os.kill(1, sig)
                signals[sig] = 'sent'
            except OSError as exc:
                signals[sig] = type(exc).__name__
        for sig in (signal.SIGKILL, signal.SIGSTOP):
            os.kill(1, sig)  # (from inside its namespace: dropped by the kernel for an init)
        time.sleep(0.2)
        state = open('/proc/1/stat').read().split(')')[1].split()[0]
        print(json.dumps({
            'init_mem': attempt('/proc/1/mem'),
            'init_mem_write': attempt('/proc/1/mem', 'r+b'),
            'init_environ': attempt('/proc/1/environ'),
            'init_maps': maps_line,
            'ptrace_attach': call(101, 16, 1, 0, 0),  # PTRACE_ATTACH
            'ptrace_seize': call(101, 0x4206, 1, 0, 0),  # PTRACE_SEIZE
            'vm_readv': call(310, 1, ctypes.addressof(iov), 1, ctypes.addressof(iov), 1, 0),
            'vm_writev': call(311, 1, ctypes.addressof(iov), 1, ctypes.addressof(iov), 1, 0),
            'init_state': state,
            'pids': sorted(int(p) for p in os.listdir('/proc') if p.isdigit()),
        }))
    """
    assert await sandbox.backend.wait_warm(driver_spec(sandbox, marker="x"))
    zygote = the_zygote(sandbox)
    ran = await run_driver(sandbox, code, pooled=True)
    assert ran.outcome.exit_code == 0, ran.stderr
    view = json.loads(ran.stdout)
    assert view["init_mem"] == "PermissionError"  # the init shares the zygote's memory
    assert view["init_mem_write"] == "PermissionError"
    assert view["init_environ"] == "PermissionError"
    assert view["init_maps"] == "PermissionError"
    for call in ("ptrace_attach", "ptrace_seize", "vm_readv", "vm_writev"):
        assert isinstance(view[call], str), (call, view[call])  # refused (how: the filter)
    assert view["init_state"] == "S"  # neither stopped nor gone: it waits for the program
    assert view["pids"] == [1, 2]  # its own init and itself: no zygote, no other run
    assert the_zygote(sandbox) == zygote  # still the same one
    again = await run_driver(sandbox, "print('next')", pooled=True)  # and it still works
    assert (again.outcome.exit_code, again.stdout) == (0, "next\n")


@pytest.mark.timeout(90)
async def test_concurrent_runs_cannot_see_or_kill_each_other(sandbox: Harness) -> None:
    """A run that kills everything it can (kill -1) while another runs beside it, forked
    from the same zygote: the other one finishes untouched, the zygote lives on."""
    assert await sandbox.backend.wait_warm(driver_spec(sandbox, marker="x"), count=2)
    zygote = the_zygote(sandbox)
    victim = """
        import os, time
        open('/tmp/mine', 'w').write('secret')
        time.sleep(1.5)
        print('victim done', open('/tmp/mine').read(), sorted(os.listdir('/work')))
    """
    attacker = """
        import os, signal
        try:
            os.kill(-1, signal.SIGKILL)  # every process it may signal (not itself, its init)
        except ProcessLookupError:
            pass  # there was none
        print('attacker', sorted(int(p) for p in os.listdir('/proc') if p.isdigit()),
              os.path.exists('/tmp/mine'), sorted(os.listdir('/work')))
    """
    results = {}

    async def run(name: str, code: str) -> None:
        results[name] = await run_driver(sandbox, code, pooled=True)

    async with anyio.create_task_group() as tg:
        tg.start_soon(run, "victim", victim)
        await anyio.sleep(0.3)
        tg.start_soon(run, "attacker", attacker)
    assert results["attacker"].stdout == "attacker [1, 2] False ['main.py']\n", results["attacker"]
    assert results["victim"].outcome.exit_code == 0, results["victim"].stderr
    assert results["victim"].stdout == "victim done secret ['main.py']\n"
    assert the_zygote(sandbox) == zygote


@pytest.mark.timeout(90)
async def test_a_zygote_that_dies_is_replaced(sandbox: Harness) -> None:
    spec = driver_spec(sandbox, marker="x")
    assert await sandbox.backend.wait_warm(spec)
    old = the_zygote(sandbox)
    os.kill(old, signal.SIGKILL)  # the OOM killer, an operator
    pool = sandbox.backend._pool
    assert pool is not None
    await eventually(lambda: all(not e.box.alive() for s in pool._keys.values() for e in s.idle))
    # Its forks die with it (each is its child, and dies with its parent); the pool
    # drops them, and the next sandboxes come from a new zygote.
    for _ in range(4):
        ran = await run_driver(sandbox, "print('still served')", pooled=True)
        assert ran.outcome.exit_code == 0, ran.stderr
        assert ran.stdout == "still served\n"
    await eventually(lambda: sandbox.backend._zygotes and sandbox.backend._zygotes._zygotes)
    assert the_zygote(sandbox) != old


def the_zygote_record(harness: Harness) -> Zygote:
    zygotes = harness.backend._zygotes
    assert zygotes is not None
    (zygote,) = zygotes._zygotes.values()
    return zygote


def children(pid: int) -> dict[int, str]:
    """A process's children and their states (R, S, Z, ...)."""
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        pids = [int(p) for p in f.read().split()]
    states = {}
    for child in pids:
        try:
            with open(f"/proc/{child}/stat") as f:
                states[child] = f.read().rsplit(")", 1)[1].split()[0]
        except FileNotFoundError:
            pass  # reaped meanwhile
    return states


def virtual_size(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        (line,) = [x for x in f if x.startswith("VmSize:")]
    return int(line.split()[1]) * 1024


def native_stack_size() -> int:
    found = re.search(r"#define ZY_STACK \((\d+) \* 1024\)", native.SOURCE.read_text())
    assert found is not None
    return int(found[1]) * 1024


@pytest.mark.timeout(120)
async def test_the_zygote_reaps_its_runs_and_unmaps_their_stacks(sandbox: Harness) -> None:
    """Each run's init (G) is the zygote's child with a stack of its own: as it ends, the
    zygote reaps it (no zombie waits for the next request) and unmaps the stack, so that
    nothing piles up in the zygote however many runs it makes."""
    assert (await run_driver(sandbox, "print('first')", pooled=True)).stdout == "first\n"
    zygote = the_zygote(sandbox)
    pool = sandbox.backend._pool
    assert pool is not None

    def settled() -> dict[int, str] | None:  # every child alive: the pool's forks
        states = children(zygote)
        ready = sum(len(s.idle) for s in pool._keys.values())
        return states if ready >= 1 and "Z" not in states.values() else None

    rest = []  # the zygote's size without its runs' stacks, after each batch
    for _ in range(2):
        for i in range(12):
            ran = await run_driver(sandbox, f"print({i})", pooled=True)
            assert (ran.outcome.exit_code, ran.stdout) == (0, f"{i}\n"), ran.stderr
        states = await eventually(settled, within=10)
        rest.append(virtual_size(zygote) - len(states) * native_stack_size())
    assert rest[1] == rest[0]  # a stack for each init alive, nothing more
    assert the_zygote(sandbox) == zygote


@pytest.mark.timeout(90)
async def test_a_request_the_zygote_cannot_take_makes_no_run(sandbox: Harness) -> None:
    """Malformed fork requests: the zygote says why, makes no run, closes the fds that
    came with each, and serves the next request."""
    assert (await run_driver(sandbox, "print('warm')", pooled=True)).stdout == "warm\n"
    record = the_zygote_record(sandbox)
    zygote = the_zygote(sandbox)
    before, said = set(children(zygote)), record.said.count(b"zygote: ")
    good = "hostname=x\njob_fd=5\nfd.job=0\nfd.status=1\nfd.workspace=2\ntarget.0=job"
    bad = {
        "no '='": "hostname=x\njob_fd\nfd.job=0",
        "no status": "hostname=x\njob_fd=5\nfd.job=0\nfd.workspace=2",
        "fd index": good.replace("fd.workspace=2", "fd.workspace=9"),
        "target": good + "\ntarget.1=nothing",
        "rlimits": good + "".join(f"\nrlimit.{i}=1" for i in range(17)),
        "cgroups": good + "".join(f"\nfd.cgroup{i}=0" for i in range(9)),
        "bpf size": good + "\n\n" + "x" * 7,
    }
    for why, header in bad.items():
        pairs = [socket.socketpair() for _ in range(3)]
        message = header.encode() if "\n\n" in header else header.encode() + b"\n\n"
        rights = array.array("i", [b.fileno() for _, b in pairs])
        record.control.sendmsg([message], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, rights)])
        for a, b in pairs:
            b.close()
            a.settimeout(10)
            assert a.recv(1) == b"", why  # the zygote closed its copy: no run holds it
            a.close()
    await eventually(lambda: record.said.count(b"zygote: ") - said == len(bad))
    pool = sandbox.backend._pool
    assert pool is not None

    def only_refills() -> bool:  # (the pool's refills after the warm run may come late)
        inits = {e.box.init.pid for st in pool._keys.values() for e in st.idle if e.box.init}
        return set(children(zygote)) - before <= inits

    await eventually(only_refills)
    ran = await run_driver(sandbox, "print('still served')", pooled=True)
    assert (ran.outcome.exit_code, ran.stdout) == (0, "still served\n"), ran.stderr
    assert the_zygote(sandbox) == zygote


@pytest.mark.timeout(60)
async def test_what_the_forks_of_one_zygote_share_and_cold_runs_do_not(
    sandbox: Harness,
) -> None:
    """docs/security.md: a fork is a copy of the zygote, not a new start, so the forks of
    one zygote share what an interpreter fixes when it starts (the hash secret, the
    address layout); a cold run gets fresh ones each time."""
    probe = "import sys; print(hash('abc'), id(sys))"
    seen = {}
    for pooled in (True, True, False, False):
        ran = await run_driver(sandbox, probe, pooled=pooled)
        assert ran.outcome.exit_code == 0, ran.stderr
        seen.setdefault(pooled, []).append(ran.stdout.split())
    assert seen[True][0] == seen[True][1]
    assert seen[False][0][0] != seen[False][1][0]  # (the same by chance: 1 in 2**64)


@pytest.mark.timeout(60)
async def test_a_forked_runs_workspace_is_its_own_and_capped(sandbox: Harness) -> None:
    spec = driver_spec(sandbox, marker=os.urandom(6).hex(), disk_mb=64)
    work = await pooled_workspace(sandbox, spec)
    assert str(work).startswith(DETACHED_PREFIX)
    (work / "main.py").write_text(
        "import os\n"
        "st = os.statvfs('/work')\n"
        "print(st.f_blocks * st.f_frsize // 2**20, os.statvfs('/tmp').f_fsid == st.f_fsid)\n"
        "try:\n"
        "    with open('/tmp/fill', 'wb') as f:\n"
        "        f.write(b'x' * 80 * 2**20)\n"
        "except OSError as exc:\n"
        "    print(type(exc).__name__, exc.errno)\n"
    )
    out = CollectedOutput()
    outcome = await sandbox.backend.run(replace(spec, workdir=work), out)
    assert outcome.exit_code == 0, out.text("stderr")
    assert out.text("stdout") == "64 True\nOSError 28\n"  # ENOSPC: /work and /tmp share 64 MiB
    await sandbox.backend.remove_workspace(work)
    assert work not in sandbox.backend._workspaces._detached  # its fd is closed


@pytest.mark.timeout(60)
async def test_a_fork_that_dies_before_its_run_runs_cold_with_the_project(
    sandbox: Harness,
) -> None:
    """Handed out, written to, then killed before its run: the project written to its
    detached workspace runs in a cold sandbox, and nothing of either is left."""
    spec = driver_spec(sandbox, marker=os.urandom(6).hex())
    work = await pooled_workspace(sandbox, spec)
    assert str(work).startswith(DETACHED_PREFIX)
    (work / "main.py").write_text("import helper\nprint(helper.X)\n")
    (work / "helper.py").write_text("X = 'from the project'\n")
    box = sandbox.backend._claimed[work].box
    assert box.init is not None
    os.kill(box.init.pid, signal.SIGKILL)
    await eventually(lambda: not box.alive())
    out = CollectedOutput()
    outcome = await sandbox.backend.run(replace(spec, workdir=work), out)
    assert outcome.exit_code == 0, out.text("stderr")
    assert out.text("stdout") == "from the project\n"
    await sandbox.backend.remove_workspace(work)
    assert not list(sandbox.settings.runs_path.glob("exe_*"))  # the cold copy is gone


# --- the end of a forked run ------------------------------------------------------------


@pytest.mark.timeout(60)
async def test_a_forged_end_only_ends_the_run_sooner(sandbox: Harness) -> None:
    """The program says "exit 0" on the report channel, closes its output and spins:
    the run ends there, and the spinning program is killed with it (the harness checks
    every process of the run is dying at the answer and gone after the cleanup)."""
    code = """
        import os
        print('before', flush=True)
        os.write(3, b'\\nexit 0\\n')
        for fd in (1, 2, 3):
            os.close(fd)
        while True:
            pass
    """
    ran = await run_driver(sandbox, code, pooled=True, timeout_seconds=30)
    assert ran.outcome.exit_code == 0
    assert not ran.outcome.timed_out
    assert ran.stdout == "before\n"
    assert ran.elapsed < 15  # ended by its word, not by its 30 s timeout


@pytest.mark.timeout(60)
async def test_what_a_run_leaves_running_is_killed_with_it(sandbox: Harness) -> None:
    """A background process without the run's output (so the run's end is its program's
    word, not its init's) and one that holds stdout (the init's): both killed with the
    run, neither's output after the program's end is kept."""
    code = """
        import subprocess, sys
        subprocess.Popen(['sleep', '30'], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                         start_new_session=True)
        if sys.argv[1:] == ['holding']:
            subprocess.Popen(['sh', '-c', 'sleep 2; echo late'])
        print('main done')
    """
    for args in ((), ("holding",)):
        ran = await run_driver(sandbox, code, pooled=True, args=args)
        assert ran.outcome.exit_code == 0, ran.stderr
        assert ran.stdout == "main done\n"
        assert ran.elapsed < 2  # the end did not wait for what the program left behind


@pytest.mark.timeout(120)
async def test_pooled_runs_with_the_servers_fds_past_1024(sandbox: Harness) -> None:
    """A busy server holds many fds: the pool's checks on its sandboxes (alive, ended)
    work for fd numbers past select()'s 1024."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard < 1400:
        pytest.skip(f"RLIMIT_NOFILE hard limit {hard} < 1400")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 1400), hard))
    filler = [os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC) for _ in range(1100)]
    try:
        for _ in range(3):  # the fds of these sandboxes are all above 1024 now
            ran = await run_driver(sandbox, "print('past 1024')", pooled=True)
            assert (ran.outcome.exit_code, ran.stdout) == (0, "past 1024\n"), ran.stderr
            assert min(ran_fds(sandbox)) > 1024
    finally:
        for fd in filler:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def ran_fds(harness: Harness) -> list[int]:
    """The fds the pool's ready sandboxes hold in the server."""
    pool = harness.backend._pool
    assert pool is not None
    return [fd for state in pool._keys.values() for e in state.idle for fd in e.box.fds._open]


@pytest.mark.timeout(90)
async def test_without_a_c_compiler_bwrap_starts_the_pooled_sandboxes(
    sandbox_settings: Settings,
    interpreter: Interpreter,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    """No compiler on the host: no native part, so no zygote; pooled runs still run (in
    sandboxes bwrap started), and the backend says the zygote is off for the key."""
    empty = tmp_path / "bin"
    empty.mkdir()
    for tool in ("bwrap", "setpriv", "prlimit", "slirp4netns", "ip", "nft", "nsenter"):
        found = shutil.which(tool)
        if found:
            (empty / tool).symlink_to(found)
    monkeypatch.setenv("PATH", str(empty))
    monkeypatch.delenv("CC", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    native.native_library.cache_clear()
    try:
        async with started_harness(sandbox_settings, interpreter) as harness:
            ran = await run_driver(harness, "import os; print(os.getpid())", pooled=True)
            assert (ran.outcome.exit_code, ran.stdout) == (0, "2\n"), ran.stderr
            described = harness.backend.describe()["zygote"]
            assert described["made"] == 0 and described["broken"] == 1
    finally:
        native.native_library.cache_clear()
    assert not (tmp_path / "cache").exists()


def test_the_native_part_is_built_once_and_cached(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    native.native_library.cache_clear()
    try:
        library = native.native_library()
        assert library is not None and library[:4] == b"\x7fELF"
        (cached,) = (tmp_path / "python-executor").iterdir()
        assert cached.read_bytes() == library
        assert (tmp_path / "python-executor").stat().st_mode & 0o777 == 0o700
        native.native_library.cache_clear()
        cached.write_bytes(library + b"cached")  # the second process reads it, no build
        assert native.native_library() == library + b"cached"
        native.native_library.cache_clear()
        (tmp_path / "python-executor").chmod(0o777)  # anyone could swap the file: not used
        assert native.native_library() == library
        native.native_library.cache_clear()
        monkeypatch.setenv("CC", "false")  # a compiler that fails: none, and said why
        assert native.native_library() is None
    finally:
        native.native_library.cache_clear()
