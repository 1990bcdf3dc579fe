"""What a program in the bwrap sandbox can see and touch: hostile probes, observed effects."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import anyio
import pytest
from bwrap_harness import BASE_ENV, MARKER_VAR, Harness, eventually, host_status, marker_pids
from python_executor_server.sandbox.base import CollectedOutput, Mount
from python_executor_server.sandbox.bwrap import BwrapBackend

pytestmark = pytest.mark.sandbox


@pytest.mark.timeout(60)
async def test_hello_world(sandbox: Harness) -> None:
    ran = await sandbox.run("print('hello from the sandbox')")
    assert ran.outcome.exit_code == 0, ran.stderr
    assert ran.stdout == "hello from the sandbox\n"
    assert ran.outcome.error is None and not ran.outcome.timed_out
    assert not ran.outcome.oom_killed


@pytest.mark.timeout(60)
async def test_exit_code_and_stderr(sandbox: Harness) -> None:
    ran = await sandbox.run("import sys; print('bad', file=sys.stderr); sys.exit(7)")
    assert ran.outcome.exit_code == 7
    assert ran.stderr == "bad\n"


@pytest.mark.timeout(60)
async def test_environment_is_exactly_the_spec(
    sandbox: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PYEXEC_SERVER_SECRET", "hunter2")
    ran = await sandbox.run(
        """
        import json, os
        print(json.dumps(dict(os.environ)))
        """,
        env={"USER_VAR": "x y=z"},
    )
    env = json.loads(ran.stdout)
    # bwrap sets PWD to the working directory; nothing else is added.
    assert env == {**BASE_ENV, "USER_VAR": "x y=z", MARKER_VAR: ran.marker, "PWD": "/work"}


@pytest.mark.timeout(60)
async def test_server_environment_unreachable_through_proc(
    sandbox: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PYEXEC_SERVER_SECRET", "hunter2")
    ran = await sandbox.run(
        """
        import os
        found = []
        for pid in os.listdir('/proc'):
            if pid.isdigit():
                try:
                    found.append(open(f'/proc/{pid}/environ', 'rb').read())
                except OSError:
                    pass
        print(len(found), any(b'hunter2' in e for e in found))
        """
    )
    assert ran.stdout.split()[1] == "False"
    assert int(ran.stdout.split()[0]) >= 1  # it did read its own


@pytest.mark.timeout(60)
async def test_uid_inside_and_unprivileged_uid_on_the_host(sandbox: Harness) -> None:
    code = "import os, time\nprint(os.getuid(), os.getgid(), os.getgroups(), flush=True)\n"
    work = await sandbox.workspace({"main.py": code + "time.sleep(30)\n"})
    marker = "uid-probe-" + os.urandom(4).hex()
    spec = sandbox.spec(work, marker=marker, timeout_seconds=20)
    out = CollectedOutput()
    async with anyio.create_task_group() as tg:
        tg.start_soon(sandbox.backend.run, spec, out)
        pids = await eventually(lambda: marker_pids(marker))
        seen = host_status(pids[0])
        await eventually(lambda: out.text("stdout"))
        tg.cancel_scope.cancel()
    assert out.text("stdout").split() == ["1000", "1000", "[]"]
    assert seen["Uid"].split() == ["1000"] * 4  # real, effective, saved, fs on the host
    assert seen["Gid"].split() == ["1000"] * 4
    assert seen["Groups"].strip() == ""
    assert int(seen["CapEff"], 16) == 0 and int(seen["CapPrm"], 16) == 0
    assert seen["NoNewPrivs"].strip() == "1"
    assert marker_pids(marker) == []


@pytest.mark.timeout(60)
async def test_cannot_read_etc_shadow(sandbox: Harness) -> None:
    ran = await sandbox.run(
        """
        for path in ('/etc/shadow', '/etc/gshadow', '/root/.bashrc'):
            try:
                open(path).read()
                print(path, 'READ')
            except OSError as exc:
                print(path, type(exc).__name__)
        """
    )
    assert "READ" not in ran.stdout
    assert "/etc/shadow FileNotFoundError" in ran.stdout


@pytest.mark.timeout(60)
async def test_passwd_is_ours_not_the_hosts(sandbox: Harness) -> None:
    ran = await sandbox.run("import pwd; print([p.pw_name for p in pwd.getpwall()])")
    assert ran.stdout.strip() == "['root', 'sandbox', 'nobody']"


@pytest.mark.timeout(60)
async def test_cannot_write_system_dirs_or_the_interpreter(sandbox: Harness) -> None:
    prefix = sandbox.interpreter.prefix
    ran = await sandbox.run(
        f"""
        import errno
        targets = ['/usr/evil', '/usr/bin/python3', '/etc/passwd', '/evil', '/etc/evil',
                   '/dev/evil',
                   '{prefix}/evil', '{prefix}/lib/python{sandbox.interpreter.version}/os.py']
        for path in targets:
            try:
                with open(path, 'a') as f:
                    f.write('x')
                print(path, 'WRITTEN')
            except OSError as exc:
                print(path, errno.errorcode[exc.errno])
        """
    )
    assert "WRITTEN" not in ran.stdout, ran.stdout
    for line in ran.stdout.splitlines():
        assert line.split()[1] in ("EROFS", "EACCES", "EPERM"), line
    assert not (prefix / "evil").exists()


@pytest.mark.timeout(60)
async def test_host_site_packages_not_visible(sandbox: Harness) -> None:
    site = sandbox.interpreter.prefix / f"lib/python{sandbox.interpreter.version}/site-packages"
    assert any(site.iterdir()), "precondition: the host interpreter has packages"
    ran = await sandbox.run(
        f"""
        import os, sys
        print(os.listdir('{site}'))
        try:
            import pip
            print('pip importable')
        except ImportError:
            print('no pip')
        d = '/usr/lib/python3/dist-packages'
        print(os.listdir(d) if os.path.isdir(d) else [])
        """
    )
    assert ran.stdout.splitlines() == ["[]", "no pip", "[]"], ran.stdout + ran.stderr


@pytest.mark.timeout(60)
async def test_cannot_see_host_processes(sandbox: Harness) -> None:
    ran = await sandbox.run(
        """
        import os
        pids = sorted(int(p) for p in os.listdir('/proc') if p.isdigit())
        print(pids, os.getpid())
        print(open('/proc/1/cmdline', 'rb').read().split(b'\\0')[0].decode())
        """
    )
    first, second = ran.stdout.splitlines()
    pids_text, own = first.rsplit(" ", 1)
    assert json.loads(pids_text) == [1, int(own)]  # bwrap's init and itself: nothing else
    assert second.endswith("bwrap")


@pytest.mark.timeout(60)
async def test_hostname_and_filesystem_layout(sandbox: Harness) -> None:
    ran = await sandbox.run(
        """
        import os, socket
        print(socket.gethostname(), os.getcwd())
        print(sorted(os.listdir('/')))
        """
    )
    first, second = ran.stdout.splitlines()
    assert first == "sandbox /work"
    top = set(json.loads(second.replace("'", '"')))
    assert {"usr", "etc", "proc", "dev", "work", "tmp"} <= top
    assert not top & {"home", "root", "var", "run", "sys", "opt", "srv", "mnt"} - {"root"}


@pytest.mark.timeout(60)
async def test_server_files_and_data_dir_not_visible(sandbox: Harness) -> None:
    data_dir = sandbox.settings.data_dir.resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    (data_dir / "executions.db").write_text("secret records")
    ran = await sandbox.run(
        f"""
        import os
        for path in ['{data_dir}', '{sandbox.settings.runs_path}', '/work/../..', '/sys', '/home']:
            print(path, os.path.exists(path) and sorted(os.listdir(path)))
        """
    )
    lines = dict(line.split(" ", 1) for line in ran.stdout.splitlines())
    assert lines[str(data_dir)] == "False"
    assert lines[str(sandbox.settings.runs_path)] == "False"
    assert "executions.db" not in ran.stdout


@pytest.mark.timeout(60)
async def test_other_runs_work_dirs_are_unreachable(sandbox: Harness) -> None:
    """Two concurrent runs: B hunts for A's secret by host path and by walking its view."""
    code_a = "import time\nopen('/work/secret.txt','w').write('A-SECRET')\n"
    work_a = await sandbox.workspace(
        {"main.py": code_a + "print('written', flush=True)\ntime.sleep(60)\n"}
    )
    spec_a = sandbox.spec(work_a, marker="run-a-" + os.urandom(4).hex(), timeout_seconds=30)
    hunt = f"""
        import os
        hits = []
        for top in ['/', '/tmp', '/work', '/dev/shm']:
            for root, dirs, files in os.walk(top):
                if root in ('/proc', '/usr', '/sys', '/dev'):
                    dirs[:] = []
                    continue
                for name in files:
                    try:
                        if b'A-' + b'SECRET' in open(os.path.join(root, name), 'rb').read():
                            hits.append(os.path.join(root, name))
                    except OSError:
                        pass
        print('direct', os.path.exists('{work_a}/secret.txt'), os.path.exists('{work_a}'))
        print('hits', hits)
        """
    out_a = CollectedOutput()
    async with anyio.create_task_group() as tg:
        tg.start_soon(sandbox.backend.run, spec_a, out_a)
        await eventually(lambda: "written" in out_a.text("stdout"))
        assert (work_a / "secret.txt").read_text() == "A-SECRET"
        ran_b = await sandbox.run(hunt)
        tg.cancel_scope.cancel()
    assert "direct False False" in ran_b.stdout, ran_b.stdout + ran_b.stderr
    assert "hits []" in ran_b.stdout


NETWORK_PROBE = """
import socket
try:
    s = socket.socket(socket.AF_INET)
    s.settimeout(3)
    s.connect(('127.0.0.1', {port}))
    print('CONNECTED')
except OSError as exc:
    print('refused', type(exc).__name__, exc.errno)
try:
    socket.getaddrinfo('example.com', 80)
    print('RESOLVED')
except OSError as exc:
    print('no dns', type(exc).__name__)
print(open('/proc/net/dev').read().count(':'))
"""


@pytest.mark.timeout(60)
async def test_network_off_cannot_reach_host_loopback_nor_dns(
    sandbox_either_seccomp: Harness,
) -> None:
    box = sandbox_either_seccomp
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    listener.setblocking(False)
    try:
        ran = await box.run(NETWORK_PROBE.format(port=listener.getsockname()[1]))
        with pytest.raises(BlockingIOError):
            listener.accept()  # nobody knocked
    finally:
        listener.close()
    lines = ran.stdout.splitlines()
    assert lines[0].startswith("refused"), ran.stdout + ran.stderr
    assert lines[1] == "no dns gaierror"
    assert lines[2] == "1"  # an empty namespace: loopback only


@pytest.mark.timeout(60)
async def test_stdin_is_fed_then_closed(sandbox: Harness) -> None:
    ran = await sandbox.run(
        "import sys; data = sys.stdin.read(); print(len(data), repr(data[:12]))",
        stdin=b"hello stdin\n" * 10000,
    )
    assert ran.stdout == "120000 'hello stdin\\n'\n"


@pytest.mark.timeout(60)
async def test_no_stdin_reads_eof(sandbox: Harness) -> None:
    ran = await sandbox.run("import sys; print(repr(sys.stdin.read()))")
    assert ran.stdout == "''\n"


@pytest.mark.timeout(60)
async def test_stdin_never_read_does_not_hang(sandbox: Harness) -> None:
    ran = await sandbox.run("print('ignoring stdin')", stdin=os.urandom(8 * 1024 * 1024))
    assert ran.outcome.exit_code == 0
    assert ran.stdout == "ignoring stdin\n"
    assert ran.elapsed < 10


@pytest.mark.timeout(60)
async def test_result_fd_side_channel(sandbox: Harness) -> None:
    ran = await sandbox.run(
        """
        import os
        print('visible')
        os.write(3, b'out-of-band ' * 3)
        os.close(3)
        print('still visible')
        """,
        result_fd=3,
    )
    assert ran.outcome.exit_code == 0, ran.stderr
    assert ran.outcome.side_channel == b"out-of-band " * 3
    assert ran.stdout == "visible\nstill visible\n"


@pytest.mark.timeout(60)
async def test_result_fd_at_a_higher_number_and_capped(sandbox: Harness) -> None:
    ran = await sandbox.run(
        "import os\nfor _ in range(3): os.write(9, b'x' * 1024 * 1024)\n", result_fd=9
    )
    assert ran.outcome.exit_code == 0, ran.stderr
    assert ran.outcome.side_channel == b"x" * 1024 * 1024  # capped at 1 MiB, rest drained


@pytest.mark.timeout(60)
async def test_only_stdio_and_result_fd_are_open(sandbox: Harness) -> None:
    ran = await sandbox.run(
        "import os; fds = os.listdir('/proc/self/fd'); print(sorted(map(int, fds)))",
        result_fd=5,
    )
    fds = set(json.loads(ran.stdout))
    assert {0, 1, 2, 5} <= fds
    assert len(fds - {0, 1, 2, 5}) == 1  # the directory listdir itself opened


@pytest.mark.timeout(60)
async def test_extra_mounts_read_only_and_writable(sandbox: Harness, tmp_path: Path) -> None:
    # tmp_path is under /tmp/pytest-of-root (0700): the backend must alias it.
    ro, rw = tmp_path / "ro", tmp_path / "rw"
    ro.mkdir()
    rw.mkdir()
    (ro / "lib.py").write_text("VALUE = 42\n")
    os.chmod(tmp_path, 0o700)
    os.chown(rw, 1000, 1000)
    ran = await sandbox.run(
        """
        import sys
        sys.path.insert(0, '/opt/ro')
        import lib
        print(lib.VALUE)
        open('/opt/rw/out.txt', 'w').write('written')
        try:
            open('/opt/ro/x', 'w')
        except OSError as exc:
            print(type(exc).__name__)
        """,
        mounts=(Mount(ro, "/opt/ro"), Mount(rw, "/opt/rw", writable=True)),
    )
    assert ran.stdout.split() == ["42", "OSError"], ran.stderr
    assert (rw / "out.txt").read_text() == "written"
    assert not (ro / "x").exists()


@pytest.mark.timeout(60)
async def test_setup_failure_is_an_error_not_an_exit_code(sandbox: Harness) -> None:
    ran = await sandbox.run(
        "print('never')", mounts=(Mount(Path("/nonexistent/source"), "/opt/x"),)
    )
    assert ran.outcome.exit_code is None
    assert ran.outcome.error is not None and "sandbox setup failed" in ran.outcome.error
    assert "never" not in ran.stdout


@pytest.mark.timeout(60)
async def test_describe_reports_enforcement(backend: BwrapBackend) -> None:
    info = backend.describe()
    assert info["backend"] == "bwrap"
    assert info["bwrap_version"]
    assert info["cgroup"] in ("v1", "v2")
    assert info["memory_limit"] == "cgroup"
    assert info["disk_limit"] == "tmpfs"
    assert info["host_uid"] == 1000
    assert isinstance(info["seccomp"], bool) and isinstance(info["network"], dict)


@pytest.mark.timeout(60)
async def test_workspace_is_a_capped_tmpfs_owned_by_the_sandbox_user(sandbox: Harness) -> None:
    work = await sandbox.workspace(disk_mb=32)
    st = os.statvfs(work)
    assert st.f_blocks * st.f_frsize == 32 * 1024 * 1024
    assert os.stat(work).st_uid == 1000
    await sandbox.backend.remove_workspace(work)
    assert not work.parent.exists()
    await sandbox.backend.remove_workspace(work)  # idempotent


@pytest.mark.timeout(60)
async def test_descriptors_of_the_server_do_not_leak_in(sandbox: Harness, tmp_path: Path) -> None:
    secret = tmp_path / "server-secret"
    secret.write_text("SERVER-SECRET")
    fd = os.open(secret, os.O_RDONLY)
    os.set_inheritable(fd, True)  # as if whoever started the server leaked it
    try:
        ran = await sandbox.run(
            """
            import os
            for fd in map(int, os.listdir('/proc/self/fd')):
                try:
                    print(fd, os.pread(fd, 64, 0))
                except OSError:
                    pass
            """
        )
    finally:
        os.close(fd)
    assert "SERVER-SECRET" not in ran.stdout


@pytest.mark.timeout(60)
async def test_seccomp_filter_is_loaded_when_enabled(sandbox_either_seccomp: Harness) -> None:
    """The hook, not the filter (test_seccomp.py): with it, network-off runs cannot
    even create an inet socket; without it, they can (in their empty namespace)."""
    ran = await sandbox_either_seccomp.run(
        """
        import socket
        try:
            socket.socket(socket.AF_INET).close()
            print('created')
        except OSError as exc:
            print('refused', exc.errno)
        print(open('/proc/self/status').read().split('Seccomp:')[1].split()[0])
        """
    )
    filtered = sandbox_either_seccomp.backend.describe()["seccomp"]
    mode = "2" if filtered else "0"
    first = "refused 97" if filtered else "created"  # EAFNOSUPPORT
    assert ran.stdout.split("\n")[:2] == [first, mode], ran.stdout + ran.stderr


@pytest.mark.network
@pytest.mark.timeout(60)
async def test_network_on_is_wired_to_its_own_namespace(sandbox: Harness) -> None:
    """The hook, not the network (test_network.py): a NAT interface in a namespace of
    its own, our resolv.conf. Nothing is sent anywhere."""
    if not sandbox.backend.describe()["network"].get("available"):
        pytest.skip("network attachment unavailable on this host")
    ran = await sandbox.run(
        """
        import os
        print(open('/etc/resolv.conf').read().strip())
        print(sorted(l.split(':')[0].strip() for l in open('/proc/net/dev').readlines()[2:]))
        print(os.readlink('/proc/self/ns/net'))
        """,
        network=True,
    )
    resolv, interfaces, netns = ran.stdout.splitlines()
    assert resolv == "nameserver 10.0.2.3"
    assert interfaces == "['lo', 'tap0']", ran.stdout + ran.stderr
    assert netns != os.readlink("/proc/self/ns/net")


@pytest.mark.timeout(60)
async def test_no_new_namespaces_mounts_or_privileges(sandbox_either_seccomp: Harness) -> None:
    """Layered: the seccomp filter refuses these; without it, --disable-userns and the
    missing capabilities still do."""
    ran = await sandbox_either_seccomp.run(
        """
        import ctypes, os
        libc = ctypes.CDLL(None, use_errno=True)
        CLONE_NEWUSER, CLONE_NEWNS, CLONE_NEWNET = 0x10000000, 0x00020000, 0x40000000
        for name, flags in (('user', CLONE_NEWUSER), ('mount', CLONE_NEWNS),
                            ('net', CLONE_NEWNET)):
            rc = libc.unshare(flags)
            print('unshare', name, 'OK' if rc == 0 else 'refused')
        rc = libc.mount(b'none', b'/tmp', b'tmpfs', 0, None)
        print('mount', 'OK' if rc == 0 else 'refused')
        for call in (lambda: os.setuid(0), lambda: os.chroot('/tmp')):
            try:
                call()
                print('priv OK')
            except OSError:
                print('priv refused')
        """
    )
    assert ran.outcome.exit_code == 0, ran.stderr
    assert "OK" not in ran.stdout, ran.stdout
    assert ran.stdout.count("refused") == 6
