"""The seccomp filter, loaded by a real bwrap around a real Python as uid 1000.

Each hostile call runs twice: under the filter, where it must be refused, and
without it (the control), which shows the kernel would otherwise have let it
through or answered differently, so a pass is the filter's doing.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
from python_executor_server.sandbox.seccomp import (
    compile_filter,
    describe_filter,
    seccomp_available,
    seccomp_unavailable_reason,
)

BWRAP = shutil.which("bwrap")
SYSTEM_PYTHON = "/usr/bin/python3"
SIGSYS_EXIT = 128 + 31  # bwrap exits 128+N when its child dies of signal N

pytestmark = [
    pytest.mark.sandbox,
    pytest.mark.skipif(
        platform.machine() != "x86_64", reason="the probes use x86_64 syscall numbers"
    ),
]


@pytest.fixture(autouse=True, scope="module")
def _prerequisites() -> None:
    """Skip without root or bwrap; in CI (``CI`` set) fail instead."""
    missing = [
        reason
        for reason, absent in (
            ("root (to run bwrap as uid 1000)", os.geteuid() != 0),
            ("bubblewrap (bwrap)", BWRAP is None),
        )
        if absent
    ]
    if missing:
        message = f"the seccomp tests need {', '.join(missing)}"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)


def run_sandboxed(
    code: str,
    *args: str,
    bpf: bytes | None,
    python: str = SYSTEM_PYTHON,
    timeout: float = 60,
) -> subprocess.CompletedProcess[str]:
    """``python -c code`` in a minimal bwrap sandbox (no network), optionally filtered.

    The system Python runs with bwrap itself as host uid 1000 (as the backend
    does). Interpreters under /root are unreadable by uid 1000, so for those
    bwrap runs as root and maps uid 1000 inside a new user namespace.
    """
    prefix = str(Path(python).resolve().parent.parent)
    argv = [BWRAP or "bwrap", "--unshare-all", "--unshare-user", "--die-with-parent"]
    argv += ["--uid", "1000", "--gid", "1000", "--ro-bind", "/usr", "/usr"]
    for link in ("lib", "lib64", "bin", "sbin"):
        argv += ["--symlink", f"usr/{link}", f"/{link}"]
    argv += ["--proc", "/proc", "--dev", "/dev", "--tmpfs", "/tmp", "--tmpfs", "/dev/shm"]
    if not prefix.startswith("/usr"):
        argv += ["--ro-bind", prefix, prefix]
    argv += ["--setenv", "HOME", "/tmp", "--chdir", "/tmp"]
    pass_fds: list[int] = []
    if bpf is not None:
        r, w = os.pipe()
        os.write(w, bpf)  # a filter is ~1 KiB: far below the pipe buffer
        os.close(w)
        pass_fds.append(r)
        argv += ["--seccomp", str(r)]
    argv += [python, "-c", code, *args]
    as_user = python == SYSTEM_PYTHON
    try:
        return subprocess.run(
            argv,
            pass_fds=pass_fds,
            capture_output=True,
            text=True,
            timeout=timeout,
            user=1000 if as_user else None,
            group=1000 if as_user else None,
            extra_groups=[] if as_user else None,
        )
    finally:
        for fd in pass_fds:
            os.close(fd)


def _json_result(proc: subprocess.CompletedProcess[str]) -> dict[str, str]:
    assert proc.returncode == 0, proc.stderr
    result: dict[str, str] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


# --- hostile syscalls ---------------------------------------------------------

# Each probe runs in a forked child so that one that succeeds (unshare, ...)
# cannot change what the next one sees. Arguments are chosen so that, without
# the filter, the kernel gets far enough to answer something other than EPERM
# wherever that is possible (bad pointers give EFAULT, bad flags EINVAL).
PROBE_PROGRAM = textwrap.dedent(
    """
    import ctypes, errno, json, os, sys, time
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    PROBES = json.loads(sys.argv[1])

    def call(nr, args):
        me = os.getpid()
        r = libc.syscall(ctypes.c_long(nr), *[ctypes.c_long(a) for a in args])
        if os.getpid() != me:          # a clone() that succeeded: this is the child
            os._exit(0)
        return "ok" if r >= 0 else errno.errorcode.get(ctypes.get_errno(), "?")

    def probe(nr, args):
        if nr == "ptrace_attach":      # attach to a child of our own
            kid = os.fork()
            if kid == 0:
                time.sleep(30); os._exit(0)
            try:
                return call(101, [16, kid, 0, 0])
            finally:
                os.kill(kid, 9); os.waitpid(kid, 0)
        if nr == "process_vm_readv":   # read our own parent's memory
            return call(310, [os.getppid(), 0, 0, 0, 0, 0])
        return call(nr, args)

    out = {}
    for name, (nr, args) in PROBES.items():
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(r)
            os.write(w, probe(nr, args).encode()); os._exit(0)
        os.close(w)
        out[name] = os.read(r, 100).decode() or "no answer"
        os.close(r)
        os.waitpid(pid, 0)
    print(json.dumps(out))
    """
)

CLONE_FLAGS = {
    "NEWUSER": 0x10000000,
    "NEWNS": 0x00020000,
    "NEWPID": 0x20000000,
    "NEWNET": 0x40000000,
    "NEWUTS": 0x04000000,
    "NEWIPC": 0x08000000,
    "NEWCGROUP": 0x02000000,
}
SIGCHLD = 17

# name -> (x86_64 syscall number, arguments, errno under the filter)
PROBES: dict[str, tuple[int | str, list[int], str]] = {
    "ptrace_traceme": (101, [0, 0, 0, 0], "EPERM"),
    "ptrace_attach": ("ptrace_attach", [], "EPERM"),
    "process_vm_readv": ("process_vm_readv", [], "EPERM"),
    "process_vm_writev": (311, [1, 0, 0, 0, 0, 0], "EPERM"),
    "unshare_newuser": (272, [CLONE_FLAGS["NEWUSER"]], "EPERM"),
    "unshare_newns": (272, [CLONE_FLAGS["NEWNS"]], "EPERM"),
    "setns": (308, [-1, 0], "EPERM"),
    "mount": (165, [1, 1, 1, 0, 0], "EPERM"),
    "umount2": (166, [1, 0xFFFF], "EPERM"),
    "pivot_root": (155, [1, 1], "EPERM"),
    "chroot": (161, [1], "EPERM"),
    "fsopen": (430, [1, 0], "EPERM"),
    "open_tree": (428, [-100, 1, 0], "EPERM"),
    "keyctl": (250, [1, 0], "EPERM"),  # KEYCTL_JOIN_SESSION_KEYRING
    "add_key": (248, [1, 1, 0, 0, 0], "EPERM"),
    "request_key": (249, [1, 1, 0, 0], "EPERM"),
    "bpf": (321, [0xFFFF, 0, 0], "EPERM"),
    "perf_event_open": (298, [0, 0, -1, -1, 0], "EPERM"),
    "userfaultfd": (323, [1], "EPERM"),  # UFFD_USER_MODE_ONLY
    "io_uring_setup": (425, [1, 0], "EPERM"),
    "kexec_load": (246, [0, 0, 0, 0], "EPERM"),
    "init_module": (175, [0, 0, 0], "EPERM"),
    "finit_module": (313, [-1, 0, 0], "EPERM"),
    "delete_module": (176, [1, 0], "EPERM"),
    "open_by_handle_at": (304, [-1, 0, 0], "EPERM"),
    "name_to_handle_at": (303, [-100, 1, 0, 0, 0], "EPERM"),
    "acct": (163, [0], "EPERM"),
    "swapon": (167, [1, 0], "EPERM"),
    "reboot": (169, [0, 0, 0, 0], "EPERM"),
    "syslog": (103, [3, 0, 0], "EPERM"),
    "quotactl": (179, [0, 0, 0, 0], "EPERM"),
    "lookup_dcookie": (212, [0, 0, 0], "EPERM"),
    "fanotify_init": (300, [0, 0], "EPERM"),
    "iopl": (172, [3], "EPERM"),
    "ioperm": (173, [0, 1, 1], "EPERM"),
    "settimeofday": (164, [1, 0], "EPERM"),
    "clock_settime": (227, [0, 1], "EPERM"),
    "adjtimex": (159, [1], "EPERM"),
    "personality_no_aslr": (135, [0x0040000], "EPERM"),  # ADDR_NO_RANDOMIZE
    "personality_read_implies_exec": (135, [0x0400000], "EPERM"),
    "ioctl_tiocsti": (16, [0, 0x5412, 1], "EPERM"),
    "ioctl_tiocsti_high_bits": (16, [0, 0x1_0000_5412, 1], "EPERM"),  # CVE-2019-10063 style
    "clone3": (435, [0, 0], "ENOSYS"),  # glibc then falls back to clone
    **{
        f"clone_{flag}": (56, [value | SIGCHLD, 0, 0, 0, 0], "EPERM")
        for flag, value in CLONE_FLAGS.items()
    },
}
# Without the filter these succeed or fail differently: the filter is what stops them.
KERNEL_WOULD_ALLOW = {
    "ptrace_attach", "unshare_newuser", "clone_NEWUSER", "keyctl", "userfaultfd",
    "personality_no_aslr", "personality_read_implies_exec",
}  # fmt: skip


@pytest.fixture(scope="module")
def probe_results() -> Iterator[dict[str, dict[str, str]]]:
    arg = json.dumps({name: [nr, args] for name, (nr, args, _) in PROBES.items()})
    filtered = run_sandboxed(PROBE_PROGRAM, arg, bpf=compile_filter(allow_inet=False))
    control = run_sandboxed(PROBE_PROGRAM, arg, bpf=None)
    yield {"filtered": _json_result(filtered), "control": _json_result(control)}


@pytest.mark.timeout(120)
@pytest.mark.parametrize("name", sorted(PROBES))
def test_hostile_syscall_is_refused(name: str, probe_results: dict[str, dict[str, str]]) -> None:
    expected = PROBES[name][2]
    assert probe_results["filtered"][name] == expected
    if name in KERNEL_WOULD_ALLOW:
        assert probe_results["control"][name] == "ok"
    else:  # same syscall without the filter: the kernel itself answers
        assert probe_results["control"][name] != "no answer"


@pytest.mark.timeout(120)
def test_control_shows_the_filter_is_what_refuses(probe_results: dict[str, dict[str, str]]) -> None:
    """Most probes get a different answer without the filter (EFAULT, EINVAL, ok ...)."""
    differ = [n for n in PROBES if probe_results["control"][n] != probe_results["filtered"][n]]
    assert len(differ) >= len(PROBES) // 2, probe_results["control"]


@pytest.mark.timeout(60)
def test_filter_is_installed_with_no_new_privs() -> None:
    code = "print(open('/proc/self/status').read())"
    proc = run_sandboxed(code, bpf=compile_filter(allow_inet=False))
    assert proc.returncode == 0, proc.stderr
    status = dict(line.split(":\t", 1) for line in proc.stdout.splitlines() if ":\t" in line)
    assert status["Seccomp"].strip() == "2"  # SECCOMP_MODE_FILTER
    assert status["NoNewPrivs"].strip() == "1"
    assert status["CapEff"].strip() == "0000000000000000"


# --- other ABIs -----------------------------------------------------------------

X32_GETPID = """
import ctypes
libc = ctypes.CDLL(None, use_errno=True)
print("alive", flush=True)
print("x32 getpid ->", libc.syscall(0x40000000 | 39), ctypes.get_errno(), flush=True)
"""

# mov eax, 310 (i386 unshare); mov ebx, CLONE_NEWUSER; int 0x80; ret
I386_UNSHARE = """
import ctypes, mmap
code = bytes.fromhex("b836010000" "bb00000010" "cd80" "c3")
buf = mmap.mmap(-1, mmap.PAGESIZE, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
buf.write(code)
fn = ctypes.CFUNCTYPE(ctypes.c_int)(ctypes.addressof(ctypes.c_char.from_buffer(buf)))
print("alive", flush=True)
print("i386 unshare ->", fn(), flush=True)
"""


@pytest.mark.timeout(60)
@pytest.mark.parametrize("program", [X32_GETPID, I386_UNSHARE], ids=["x32", "i386"])
def test_foreign_abi_syscall_kills_the_process(program: str) -> None:
    filtered = run_sandboxed(program, bpf=compile_filter(allow_inet=True))
    assert filtered.stdout == "alive\n"
    assert filtered.returncode == SIGSYS_EXIT, filtered.stderr
    control = run_sandboxed(program, bpf=None)
    assert control.returncode != SIGSYS_EXIT  # the kernel alone answers, or faults


@pytest.mark.timeout(60)
def test_i386_abi_would_bypass_a_native_only_rule_without_the_filter() -> None:
    """Documents why foreign ABIs must be stopped: this kernel runs i386 syscalls."""
    control = run_sandboxed(I386_UNSHARE, bpf=None)
    if control.returncode != 0:
        pytest.skip("this kernel has no i386 emulation: nothing to bypass")
    assert "i386 unshare -> 0" in control.stdout  # a new user namespace, unfiltered


# --- sockets ----------------------------------------------------------------------

SOCKETS = """
import errno, json, socket
def try_family(family, kind=socket.SOCK_STREAM):
    try:
        socket.socket(family, kind).close()
        return "ok"
    except OSError as e:
        return errno.errorcode[e.errno]
import ctypes
libc = ctypes.CDLL(None, use_errno=True)
def raw_socket(domain):
    fd = libc.syscall(ctypes.c_long(41), ctypes.c_long(domain), ctypes.c_long(2), 0)
    return "ok" if fd >= 0 else errno.errorcode[ctypes.get_errno()]
a, b = socket.socketpair()
a.sendall(b"ping")
print(json.dumps({
    "unix": try_family(socket.AF_UNIX),
    "socketpair": b.recv(4).decode(),
    "inet": try_family(socket.AF_INET),
    "inet_udp": try_family(socket.AF_INET, socket.SOCK_DGRAM),
    "inet6": try_family(socket.AF_INET6),
    "netlink": try_family(socket.AF_NETLINK, socket.SOCK_RAW),
    "packet": try_family(socket.AF_PACKET, socket.SOCK_RAW),
    "alg": try_family(38, socket.SOCK_SEQPACKET),
    "vsock": try_family(40),
    "unspec": raw_socket(0),
    "inet_high_bits": raw_socket(0x1_0000_0002),
}))
"""


@pytest.mark.timeout(60)
def test_network_off_refuses_every_socket_family_but_unix() -> None:
    got = _json_result(run_sandboxed(SOCKETS, bpf=compile_filter(allow_inet=False)))
    assert got["unix"] == "ok"
    assert got["socketpair"] == "ping"
    for family in ("inet", "inet_udp", "inet6", "netlink", "packet", "alg", "vsock"):
        assert got[family] == "EAFNOSUPPORT", family
    assert got["unspec"] == "EAFNOSUPPORT"
    assert got["inet_high_bits"] == "EAFNOSUPPORT"
    control = _json_result(run_sandboxed(SOCKETS, bpf=None))
    assert control["inet"] == "ok"  # an empty network namespace still makes sockets
    assert control["inet_high_bits"] == "ok"  # the kernel reads the family as 32 bits


@pytest.mark.timeout(60)
def test_network_on_allows_inet_and_netlink_only() -> None:
    got = _json_result(run_sandboxed(SOCKETS, bpf=compile_filter(allow_inet=True)))
    for family in ("unix", "inet", "inet_udp", "inet6", "netlink"):
        assert got[family] == "ok", family
    for family in ("packet", "alg", "vsock", "unspec", "inet_high_bits"):
        assert got[family] == "EAFNOSUPPORT", family


# --- ordinary Python keeps working ----------------------------------------------

ORDINARY = """
import asyncio, concurrent.futures, ctypes, ctypes.util, json, multiprocessing, os
import socket, subprocess, sys, tempfile, threading

results = []
threads = [threading.Thread(target=results.append, args=(i,)) for i in range(8)]
for t in threads: t.start()
for t in threads: t.join()
assert sorted(results) == list(range(8))
with concurrent.futures.ThreadPoolExecutor(4) as ex:
    assert list(ex.map(abs, [-1, -2, -3])) == [1, 2, 3]

out = subprocess.run([sys.executable, "-c", "print('child')"], capture_output=True, text=True)
assert out.stdout == "child\\n", out
assert subprocess.run(["/bin/sh", "-c", "exit 3"]).returncode == 3
pid = os.posix_spawn(sys.executable, [sys.executable, "-c", "pass"], os.environ)
assert os.waitpid(pid, 0)[1] == 0

def square(x):
    return x * x

if __name__ == "__main__":
    for method in ("fork", "spawn", "forkserver"):
        ctx = multiprocessing.get_context(method)
        with ctx.Pool(2) as pool:
            assert pool.map(square, range(5)) == [0, 1, 4, 9, 16], method
        q = ctx.Queue(); lock = ctx.Lock()
        with lock:
            q.put(method)
        assert q.get(timeout=10) == method
    with concurrent.futures.ProcessPoolExecutor(2) as ex:
        assert list(ex.map(square, [3])) == [9]

    async def main():
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-c", "print(42)", stdout=asyncio.subprocess.PIPE)
        out, _ = await proc.communicate()
        assert out == b"42\\n"
        await asyncio.sleep(0.01)
        assert await asyncio.get_running_loop().run_in_executor(None, abs, -5) == 5
        path = tempfile.mktemp(suffix=".sock")
        server = await asyncio.start_unix_server(lambda r, w: w.write(b"hi"), path)
        reader, writer = await asyncio.open_unix_connection(path)
        assert await reader.read(2) == b"hi"
        writer.close(); server.close()
    asyncio.run(main())

    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    assert libc.getpid() == os.getpid()
    assert libc.personality(0) >= 0          # PER_LINUX stays allowed
    os.setsid()
    print("ALL OK", sys.version_info[:2])
"""


def _interpreters() -> list[str]:
    found = [SYSTEM_PYTHON]
    pyenv = Path("/root/.pyenv/versions")
    for minor in ("3.10", "3.11", "3.12", "3.13"):
        found += [str(p / "bin/python3") for p in sorted(pyenv.glob(f"{minor}.*"))[-1:]]
    return [p for p in found if os.access(p, os.X_OK)]


@pytest.mark.timeout(180)
@pytest.mark.parametrize("python", _interpreters())
@pytest.mark.parametrize("allow_inet", [False, True], ids=["net-off", "net-on"])
def test_ordinary_python_works_under_the_filter(python: str, allow_inet: bool) -> None:
    # from a file, as multiprocessing's spawn re-imports __main__ by path
    launcher = (
        f"import os, sys; open('/tmp/main.py', 'w').write({ORDINARY!r}); "
        "os.execv(sys.executable, [sys.executable, '/tmp/main.py'])"
    )
    proc = run_sandboxed(launcher, bpf=compile_filter(allow_inet=allow_inet), python=python)
    assert proc.returncode == 0, proc.stderr
    assert "ALL OK" in proc.stdout


# --- the compiled program itself --------------------------------------------------


@pytest.mark.timeout(30)
def test_compiled_filters_are_cached_bpf_programs() -> None:
    assert seccomp_available(), seccomp_unavailable_reason()
    off, on = compile_filter(allow_inet=False), compile_filter(allow_inet=True)
    assert compile_filter(allow_inet=False) is off  # compiled once per flag
    assert off != on
    for program in (off, on):
        assert len(program) % 8 == 0 and 0 < len(program) // 8 < 4096  # BPF_MAXINSNS
    text = describe_filter(allow_inet=False)
    assert "invalid architecture action\naction KILL_PROCESS" in text
