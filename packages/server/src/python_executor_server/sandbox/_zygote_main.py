# The zygote: appended to the eval driver's source (``zygote.py`` joins them) and run
# inside one bwrap sandbox per pool key. It never runs a user's code. For each request on
# its control socket it clones a run (G) into fresh namespaces of its own, which returns,
# one process later, into the driver's ``main()`` as a program started with ``--job-fd N``
# would: the run's processes are copies of an interpreter that has only ever run this
# file. Standard library only; Python 3.10+.
#
# Per run::
#
#   G  (cloned by the zygote with new user, mount, pid, network, ipc and uts namespaces:
#      pid 1 of its own, as bwrap's init)  map its own uid, set its rlimits, report to
#      the host over the job socket (SCM_CREDENTIALS: the host learns its pid), wait
#      until the host has moved it into the run's cgroup; mount the workspace (a tmpfs
#      the host made and passed as a mount fd) at /work and /tmp, a fresh /proc; hostname,
#      loopback; a cgroup namespace; drop every capability, no_new_privs, the seccomp
#      filter; fork H and reap until H ends, kill and reap every other process left,
#      then write H's status (128+N after signal N) to the status fd and exit with it.
#      The host sees the fd's end if G dies.
#   H  (pid 2)  the run's fds at their numbers and nothing else, /work as cwd, the
#      zygote's own modules out of sys.modules; back to ``main()`` with the job fd.
#
# Control messages (SOCK_SEQPACKET, one per run): ``key=value`` lines, a blank line, then
# the BPF program; SCM_RIGHTS carries the fds named by the ``fd.*`` keys (by index).


# (The driver imported these already; named again so that this file stands alone.)
import _ast  # noqa: F401  (every run imports it before its job: _receive_job)
import os
import sys

_zygote_known = set(sys.modules)  # what a run has loaded by now; the rest is the zygote's

import ctypes  # noqa: E402
import fcntl  # noqa: E402
import resource  # noqa: E402
import signal  # noqa: E402
import socket  # noqa: E402
import struct  # noqa: E402

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mount.argtypes = [ctypes.c_char_p] * 3 + [ctypes.c_ulong, ctypes.c_char_p]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
_libc.syscall.restype = ctypes.c_long
_libc.prctl.argtypes = [ctypes.c_int] + [ctypes.c_ulong] * 4
_CLONE = {"x86_64": 56, "aarch64": 220}.get(os.uname().machine)  # the clone(2) syscall
# CLONE_NEWUSER, CLONE_NEWNS, CLONE_NEWPID, CLONE_NEWNET, CLONE_NEWIPC, CLONE_NEWUTS
_NAMESPACES = 0x10000000 | 0x00020000 | 0x20000000 | 0x40000000 | 0x08000000 | 0x04000000


class _ZygoteProg(ctypes.Structure):  # struct sock_fprog (made once: not per run)
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


def _zygote_serve(control: int) -> list[str]:
    """Serve fork requests until the host closes ``control``; returns only in a run (H)."""
    import gc

    sock = socket.socket(fileno=control)
    uid, gid = os.getuid(), os.getgid()

    def reap(*_: object) -> None:
        while True:
            try:
                pid, _status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return

    signal.signal(signal.SIGCHLD, reap)
    gc.collect()
    gc.freeze()  # the runs' copies share these pages instead of touching them
    while True:
        try:
            data, ancillary, _flags, _addr = sock.recvmsg(1 << 16, socket.CMSG_SPACE(64 * 4))
        except InterruptedError:
            continue
        if not data:
            os._exit(0)  # the host is gone or closed us
        fds: list[int] = []
        for level, kind, payload in ancillary:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                usable = len(payload) - len(payload) % 4
                fds += list(memoryview(payload[:usable]).cast("i"))
        header, _, bpf = data.partition(b"\n\n")
        request = dict(line.split("=", 1) for line in header.decode().splitlines())
        # clone(2) with the namespace flags: the child starts as pid 1 of its own pid
        # namespace (fork and unshare would need a third process). Safe here as fork: a
        # single thread, which ctypes lets go of the GIL around the call.
        pid = (
            -1
            if _CLONE is None
            else _libc.syscall(_CLONE, _NAMESPACES | signal.SIGCHLD, 0, 0, 0, 0)
        )
        if pid == 0:
            try:  # nothing of a run's setup may go on into the driver when it fails
                signal.signal(signal.SIGCHLD, signal.SIG_DFL)
                sock.close()
                return _zygote_run(uid, gid, request, fds, bpf)
            except (BrokenPipeError, ConnectionResetError):
                os._exit(125)  # the host gave up on this sandbox
            except BaseException as exc:
                _zygote_fail(f"{type(exc).__name__}: {exc}")
        if pid < 0:
            why = (
                "no clone(2) for " + os.uname().machine
                if _CLONE is None
                else os.strerror(ctypes.get_errno())
            )
            os.write(2, f"zygote: clone: {why}\n".encode())
        for fd in fds:  # (the host sees the job socket close if the clone failed)
            os.close(fd)


def _zygote_fail(message: str) -> None:
    os.write(2, f"zygote: {message}\n".encode())
    os._exit(126)


def _zygote_close(fds: list[int]) -> None:
    for number in fds:
        try:  # noqa: SIM105  (contextlib: not loaded in a run)
            os.close(number)
        except OSError:
            pass  # closed already (the workspace's, once attached)


def _zygote_check(result: int, what: str) -> None:
    if result != 0:
        _zygote_fail(f"{what}: {os.strerror(ctypes.get_errno())}")


def _zygote_run(
    uid: int, gid: int, request: dict[str, str], fds: list[int], bpf: bytes
) -> list[str]:
    """G, just cloned into its namespaces: its uid, rlimits, the host's go-ahead."""
    fd = {name[3:]: fds[int(index)] for name, index in request.items() if name.startswith("fd.")}
    # Dies with the zygote (whose death takes bwrap's namespace, and this one, anyway).
    _zygote_check(_libc.prctl(1, 9, 0, 0, 0), "PR_SET_PDEATHSIG")
    for name, text in (
        ("setgroups", "deny"),
        ("uid_map", f"{uid} {uid} 1"),
        ("gid_map", f"{gid} {gid} 1"),
    ):
        map_fd = os.open(f"/proc/self/{name}", os.O_WRONLY)
        os.write(map_fd, text.encode())
        os.close(map_fd)
    for name, value in request.items():
        if name.startswith("rlimit."):
            resource.setrlimit(int(name[7:]), (int(value), int(value)))
    job = fd["job"]
    os.write(job, b"c")  # the host reads our pid from the credentials the kernel attaches
    if os.read(job, 1) != b"p":
        os._exit(125)  # the host gave up on this sandbox
    return _zygote_init(request, fd, bpf)


def _zygote_init(request: dict[str, str], fd: dict[str, int], bpf: bytes) -> list[str]:
    """G, in its cgroup: the run's filesystem, hostname, loopback, confinement; then H."""
    mount = _libc.mount
    ms_nosuid, ms_nodev, ms_noexec, ms_remount, ms_bind, ms_rec = 2, 4, 8, 32, 4096, 0x4000
    _zygote_check(mount(None, b"/", None, ms_rec | (1 << 18), None), "make / private")
    _zygote_workspace(fd["workspace"])
    proc_flags = ms_nosuid | ms_nodev | ms_noexec
    _zygote_check(mount(b"proc", b"/proc", b"proc", proc_flags, None), "mount /proc")
    for name in ("sys", "sysrq-trigger", "irq", "bus"):  # what bwrap covers, as it does
        path = "/proc/" + name
        if os.access(path, os.W_OK):
            target = path.encode()
            _zygote_check(mount(target, target, None, ms_bind | ms_rec, None), "bind " + path)
            flags = ms_bind | ms_remount | 1 | proc_flags
            _zygote_check(mount(target, target, None, flags, None), "read-only " + path)
    socket.sethostname(request["hostname"])
    _zygote_loopback_up()
    _zygote_check(_libc.unshare(0x02000000), "unshare cgroup")
    os.setsid()
    _zygote_check(_libc.prctl(4, 0, 0, 0, 0), "PR_SET_DUMPABLE")
    _zygote_drop_privileges(bpf)
    try:
        pid = os.fork()
    except OSError as exc:
        _zygote_fail(f"fork: {exc}")
    if pid == 0:
        return _zygote_program(request, fd)
    status_fd = fd["status"]
    _zygote_close([n for n in fd.values() if n != status_fd])
    while True:  # the namespace's init: reap everything, end with the program
        try:
            child, status = os.wait()
        except InterruptedError:
            continue
        except ChildProcessError:
            os._exit(125)
        if child == pid:  # its status (128+N after signal N) is the run's, as bwrap's is
            code = os.waitstatus_to_exitcode(status)
            code = 128 - code if code < 0 else code
            _zygote_end()
            os.write(status_fd, b"%d\n" % code)  # the host answers on this
            os._exit(code)


def _zygote_end() -> None:
    """G, once the program ended: kill and reap every other process of the namespace
    (all of the run's: those its processes left behind are G's children by now, or
    will be once their parents are reaped), so that when G reports, G is all that is
    left of the run: the host answers without waiting for G's own exit."""
    while True:
        try:  # noqa: SIM105  (kill(-1) from an init: every other process of its namespace)
            os.kill(-1, signal.SIGKILL)
        except ProcessLookupError:
            pass  # none left but G (and zombies, reaped below)
        try:
            os.wait()
        except ChildProcessError:
            return  # none left at all: nothing has a parent that could still fork
        except InterruptedError:
            pass


def _zygote_workspace(workspace: int) -> None:
    """The host's detached tmpfs: its ``work`` at /work, its ``tmp`` at /tmp, its root
    nowhere (attached at /work just long enough to clone the two, then detached)."""
    syscall = _libc.syscall
    if syscall(429, workspace, b"", -100, b"/work", 4) != 0:  # move_mount, F_EMPTY_PATH
        _zygote_check(-1, "attach the workspace")
    os.close(workspace)
    clones = []
    for name in (b"work", b"tmp"):
        clone = syscall(428, -100, b"/work/" + name, 1 | 0o2000000)  # open_tree CLONE|CLOEXEC
        if clone < 0:
            _zygote_check(-1, "clone /work/" + name.decode())
        clones.append(clone)
    _zygote_check(_libc.umount2(b"/work", 2), "detach the workspace root")  # MNT_DETACH
    for clone, target in zip(clones, (b"/work", b"/tmp"), strict=True):
        if syscall(429, clone, b"", -100, target, 4) != 0:
            _zygote_check(-1, "attach " + target.decode())
        os.close(clone)


def _zygote_loopback_up() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        ifreq = struct.pack("16sH22x", b"lo", 0)
        flags = struct.unpack("16sH22x", fcntl.ioctl(s, 0x8913, ifreq))[1]  # SIOCGIFFLAGS
        fcntl.ioctl(s, 0x8914, struct.pack("16sH22x", b"lo", flags | 0x1 | 0x40))  # UP|RUNNING


def _zygote_drop_privileges(bpf: bytes) -> None:
    """No capability in any set (bounding and ambient too), no_new_privs, the filter."""
    prctl = _libc.prctl
    cap = 0
    while prctl(24, cap, 0, 0, 0) == 0:  # PR_CAPBSET_DROP until the kernel knows no more
        cap += 1
    _zygote_check(prctl(47, 4, 0, 0, 0), "PR_CAP_AMBIENT_CLEAR_ALL")
    header = (ctypes.c_uint32 * 2)(0x20080522, 0)  # _LINUX_CAPABILITY_VERSION_3, this thread
    data = (ctypes.c_uint32 * 6)()
    _zygote_check(_libc.capset(header, data), "capset")
    _zygote_check(prctl(38, 1, 0, 0, 0), "PR_SET_NO_NEW_PRIVS")
    if bpf:
        program = ctypes.create_string_buffer(bpf, len(bpf))
        prog = _ZygoteProg(len(bpf) // 8, ctypes.addressof(program))
        _zygote_check(prctl(22, 2, ctypes.addressof(prog), 0, 0), "seccomp filter")


def _zygote_program(request: dict[str, str], fd: dict[str, int]) -> list[str]:
    """H: the fds and state of a program bwrap would have started; then the driver."""
    # G is not dumpable (its memory is the zygote's); the program is, as any process is.
    _zygote_check(_libc.prctl(4, 1, 0, 0, 0), "PR_SET_DUMPABLE")
    wanted = {int(k[7:]): fd[name] for k, name in request.items() if k.startswith("target.")}
    high = max([*wanted, *fd.values()]) + 1
    moved = {}
    for target, source in wanted.items():  # above every number first: no clobbering
        moved[target] = os.dup2(source, high + target, inheritable=False)
    _zygote_close(sorted(set(fd.values())))
    for target, source in moved.items():
        os.dup2(source, target)  # inheritable, as bwrap passes them
        os.close(source)
    keep = sorted(wanted)
    start = 0
    for number in keep:
        if start < number:  # (closerange(n, n) would close everything from n on)
            os.closerange(start, number)
        start = number + 1
    os.closerange(start, 1 << 16)
    os.chdir("/work")
    for name in set(sys.modules) - _zygote_known:  # the zygote's own: a cold run lacks them
        del sys.modules[name]
    return ["--job-fd", request["job_fd"]]
