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
#      no_new_privs, the seccomp filter; the run's fds at their numbers and nothing
#      else, /work as cwd. Then, in Python: the zygote's own modules out of
#      sys.modules; back to ``main()`` with the job fd.
#
# The zygote's loop is C too (``zy_serve``, called once and returning only in each H):
# every page the zygote writes after a fork is copied while a run forked before still
# shares it, and a loop in Python wrote about a hundred pages per run.
#
# Control messages (SOCK_SEQPACKET, one per run): ``key=value`` lines, a blank line, then
# the BPF program; SCM_RIGHTS carries the fds named by the ``fd.*`` keys (by index). The
# first message is ``native`` with the library's memfd.


# (The driver imported these already; named again so that this file stands alone.)
import _ast  # noqa: F401  (every run imports it before its job: _receive_job)
import os
import sys

_zygote_known = set(sys.modules)  # what a run has loaded by now; the rest is the zygote's

# The C module, not socket.py: that imports enum, selectors, collections and more, which
# every run would have to drop again and whose objects it would touch doing so (each
# touched page a copy). ctypes adds five modules.
import _socket  # noqa: E402
import ctypes  # noqa: E402


def _zygote_receive(sock: _socket.socket) -> tuple[bytes, list[int]]:
    while True:
        try:
            data, ancillary, _flags, _addr = sock.recvmsg(1 << 16, _socket.CMSG_SPACE(64 * 4))
        except InterruptedError:
            continue
        if not data:
            os._exit(0)  # the host is gone or closed us
        fds: list[int] = []
        for level, kind, payload in ancillary:
            if level == _socket.SOL_SOCKET and kind == _socket.SCM_RIGHTS:
                usable = len(payload) - len(payload) % 4
                fds += list(memoryview(payload[:usable]).cast("i"))
        return data, fds


def _zygote_native(control: int) -> ctypes.PyDLL:
    sock = _socket.socket(fileno=control)
    data, fds = _zygote_receive(sock)
    sock.detach()  # (the native loop reads it from now on)
    if data != b"native" or len(fds) != 1:
        _zygote_fail("the first message is not the native library")
    # PyDLL: the GIL stays held in its calls, so that zy_serve can call the fork hooks.
    native = ctypes.PyDLL(f"/proc/self/fd/{fds[0]}")
    os.close(fds[0])
    hook = ctypes.c_void_p
    native.zy_serve.restype = ctypes.c_long
    native.zy_serve.argtypes = [ctypes.c_int, hook, hook, hook, ctypes.POINTER(ctypes.c_int)]
    return native


def _zygote_serve(control: int) -> list[str]:
    """Serve fork requests until the host closes ``control``; returns only in a run (H),
    with its setup done and its fds in place (``zy_serve``)."""
    import gc

    native = _zygote_native(control)
    api = ctypes.pythonapi
    hooks = [
        ctypes.cast(getattr(api, name), ctypes.c_void_p)
        for name in ("PyOS_BeforeFork", "PyOS_AfterFork_Parent", "PyOS_AfterFork_Child")
    ]
    job_at = ctypes.c_int(-1)
    gc.collect()
    gc.freeze()  # the runs' copies share these pages instead of touching them
    result = native.zy_serve(control, *hooks, ctypes.byref(job_at))
    if result == 1:
        os._exit(0)  # the host is gone or closed us
    if result != 0:
        _zygote_fail(f"reading the requests: {os.strerror(-result)}")
    # H: the zygote's own modules out of sys.modules (a cold run lacks them)
    for name in set(sys.modules) - _zygote_known:
        del sys.modules[name]
    return ["--job-fd", str(job_at.value)]


def _zygote_fail(message: str) -> None:
    os.write(2, f"zygote: {message}\n".encode())
    os._exit(126)
