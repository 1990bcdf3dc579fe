# The zygote: appended to the eval driver's source (``zygote.py`` joins them) and run
# inside one bwrap sandbox per pool key. It never runs a user's code. For each request on
# its control socket its native part (``zygote_native.c``, loaded from the memfd the host
# sends first) makes a run: G, cloned into fresh namespaces of its own while sharing the
# zygote's memory, and H, G's fork, which returns, its setup done, into the driver's
# ``main()`` as a program started with ``--job-fd N`` would: the run's program is a copy
# of an interpreter that has only ever run this file. Standard library only; Python 3.10+.
#
# Per run::
#
#   G  (pid 1 of new user, mount, pid, network, ipc and uts namespaces, as bwrap's init;
#      C only)  set the run's rlimits, report to the host over the job socket
#      (SCM_CREDENTIALS: the host learns its pid), fork H; join the run's cgroup
#      (writing 0 to the cgroup.procs fds the host sent), drop its capabilities, reap
#      until H ends, kill and reap every other process left, then write H's status
#      (128+N after signal N) to the status fd and exit with it. The host sees the fd's
#      end if G dies.
#   H  (pid 2; C, then here)  write the namespace's uid and gid maps; join the run's
#      cgroup the same way (before anything else runs in it); mount the workspace (a
#      tmpfs the host made and passed as a mount fd) at /work and /tmp, a fresh /proc;
#      hostname, loopback; a cgroup namespace, a session; drop every capability,
#      no_new_privs, the seccomp filter. Then, in Python: the run's fds at their numbers
#      and nothing else, /work as cwd,
#      the zygote's own modules out of sys.modules; back to ``main()`` with the job fd.
#
# Control messages (SOCK_SEQPACKET, one per run): ``key=value`` lines, a blank line, then
# the BPF program; SCM_RIGHTS carries the fds named by the ``fd.*`` keys (by index). The
# first message is ``native`` with the library's memfd.


# (The driver imported these already; named again so that this file stands alone.)
import _ast  # noqa: F401  (every run imports it before its job: _receive_job)
import os
import sys

_zygote_known = set(sys.modules)  # what a run has loaded by now; the rest is the zygote's

# The C modules, not signal.py and socket.py: those import enum, selectors, collections
# and more (25 modules with ctypes'), which every run would have to drop again and whose
# objects it would touch doing so (each touched page a copy; about a fifth of a run's
# page faults).
import _signal as signal  # noqa: E402
import _socket as socket  # noqa: E402
import ctypes  # noqa: E402

_libc = ctypes.CDLL(None, use_errno=True)
_libc.prctl.argtypes = [ctypes.c_int] + [ctypes.c_ulong] * 4
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_ZYGOTE_RLIMITS = 16
_ZYGOTE_CGROUPS = 8


class _ZygoteRequest(ctypes.Structure):  # struct zy_request (zygote_native.c)
    _fields_ = [
        ("job_fd", ctypes.c_int),
        ("status_fd", ctypes.c_int),
        ("workspace_fd", ctypes.c_int),
        ("n_cgroup_fds", ctypes.c_int),
        ("cgroup_fds", ctypes.c_int * _ZYGOTE_CGROUPS),
        ("n_rlimits", ctypes.c_int),
        ("rlimit_which", ctypes.c_int * _ZYGOTE_RLIMITS),
        ("rlimit_value", ctypes.c_ulonglong * _ZYGOTE_RLIMITS),
        ("uid_map", ctypes.c_char * 64),
        ("gid_map", ctypes.c_char * 64),
        ("hostname", ctypes.c_char * 64),
        ("bpf", ctypes.c_void_p),
        ("bpf_len", ctypes.c_uint),
        ("stack", ctypes.c_void_p),
        ("error", ctypes.c_char * 160),
        ("jump", ctypes.c_void_p * 5),
        ("mask", ctypes.c_ubyte * 128),
        ("sync", ctypes.c_int * 2),
    ]


def _zygote_receive(sock: socket.socket) -> tuple[bytes, list[int]]:
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
        return data, fds


def _zygote_native(sock: socket.socket) -> ctypes.CDLL:
    data, fds = _zygote_receive(sock)
    if data != b"native" or len(fds) != 1:
        _zygote_fail("the first message is not the native library")
    native = ctypes.CDLL(f"/proc/self/fd/{fds[0]}")
    os.close(fds[0])
    native.zy_spawn.restype = ctypes.c_long
    native.zy_spawn.argtypes = [ctypes.POINTER(_ZygoteRequest)]
    native.zy_request_size.restype = ctypes.c_ulong
    native.zy_stack_size.restype = ctypes.c_ulong
    if native.zy_request_size() != ctypes.sizeof(_ZygoteRequest):
        _zygote_fail("the native library's request is not this file's")
    return native


def _zygote_serve(control: int) -> list[str]:
    """Serve fork requests until the host closes ``control``; returns only in a run (H)."""
    import gc

    sock = socket.socket(fileno=control)
    native = _zygote_native(sock)
    stack_size = native.zy_stack_size()
    stacks: dict[int, int] = {}  # G's pid -> its stack, unmapped once it is reaped
    uid, gid = os.getuid(), os.getgid()
    maps = (f"{uid} {uid} 1".encode(), f"{gid} {gid} 1".encode())
    api = ctypes.pythonapi
    # G shares our memory: nothing of the run may read it (ptrace, /proc/1/mem); H,
    # which gets a copy, makes itself dumpable again (as any process is).
    _zygote_check(_libc.prctl(4, 0, 0, 0, 0), "PR_SET_DUMPABLE")

    def reap(*_: object) -> None:
        while True:
            try:
                pid, _status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            stack = stacks.pop(pid, None)
            if stack is not None:
                _libc.munmap(stack, stack_size)

    signal.signal(signal.SIGCHLD, reap)
    gc.collect()
    gc.freeze()  # the runs' copies share these pages instead of touching them
    while True:
        data, fds = _zygote_receive(sock)
        header, _, bpf = data.partition(b"\n\n")
        request = dict(line.split("=", 1) for line in header.decode().splitlines())
        fd = {name[3:]: fds[int(i)] for name, i in request.items() if name.startswith("fd.")}
        cgroups = [number for name, number in fd.items() if name.startswith("cgroup")]
        limits = [(int(k[7:]), int(v)) for k, v in request.items() if k.startswith("rlimit.")]
        if len(cgroups) > _ZYGOTE_CGROUPS or len(limits) > _ZYGOTE_RLIMITS:
            # (none may be left out; the host sees the job socket close: no sandbox)
            os.write(2, b"zygote: more cgroups or rlimits than a request holds\n")
            _zygote_close(fds)
            continue
        req = _ZygoteRequest(job_fd=fd["job"], status_fd=fd["status"])
        req.workspace_fd = fd["workspace"]
        req.n_cgroup_fds = len(cgroups)
        for i, number in enumerate(cgroups):
            req.cgroup_fds[i] = number
        req.uid_map, req.gid_map = maps
        req.hostname = request["hostname"].encode()
        req.n_rlimits = len(limits)
        for i, (which, value) in enumerate(limits):
            req.rlimit_which[i], req.rlimit_value[i] = which, value
        program = ctypes.create_string_buffer(bpf, len(bpf)) if bpf else None
        if program is not None:
            req.bpf, req.bpf_len = ctypes.addressof(program), len(bpf) // 8
        api.PyOS_BeforeFork()
        pid = native.zy_spawn(ctypes.byref(req))
        if pid == 0:  # H: its setup done in C
            api.PyOS_AfterFork_Child()
            try:  # nothing of a run's setup may go on into the driver when it fails
                signal.signal(signal.SIGCHLD, signal.SIG_DFL)
                sock.close()
                return _zygote_program(request, fd)
            except BaseException as exc:
                _zygote_fail(f"{type(exc).__name__}: {exc}")
        api.PyOS_AfterFork_Parent()
        if pid > 0:
            stacks[pid] = req.stack
        else:
            why = f"{req.error.decode()}: {os.strerror(-pid)}"
            os.write(2, f"zygote: {why}\n".encode())
        for number in fds:  # (the host sees the job socket close if no G was made)
            os.close(number)


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
