"""The seccomp filter every sandboxed program runs under (bwrap ``--seccomp FD``).

Default allow, with a deny list of what a sandbox escape or kernel attack
needs: tracing other processes, namespaces and mounts (old and new mount
API), keyrings, eBPF, perf, userfaultfd, io_uring (which would bypass the
socket rule), module loading, kexec, clocks, swap, reboot, and TIOCSTI /
TIOCLINUX terminal injection. With ``allow_inet=False`` every socket family
except AF_UNIX is refused; with ``allow_inet=True`` AF_INET, AF_INET6 and
AF_NETLINK are added, and exotic families (packet, vsock, bluetooth, alg,
...) stay refused.

Only the native ABI is in the filter: a syscall made through another ABI
(i386 ``int 0x80``, x32 on x86_64) kills the process with SIGSYS, since no
Python program makes one on purpose.

Usage::

    if seccomp_available():
        bpf = compile_filter(allow_inet=limits.network)   # cached bytes
        os.write(pipe_w, bpf)                              # bwrap --seccomp <pipe_r>
"""

from __future__ import annotations

import errno
import functools
import tempfile
from typing import Any

# Refused outright with EPERM (names unknown on this architecture are skipped).
# fmt: off
DENIED_SYSCALLS: tuple[str, ...] = (
    # other processes
    "ptrace", "process_vm_readv", "process_vm_writev", "process_madvise", "kcmp",
    "pidfd_getfd", "move_pages", "migrate_pages",
    # namespaces and mounts (old and new mount API), root changes, file handles
    "unshare", "setns", "mount", "umount", "umount2", "pivot_root", "chroot",
    "fsopen", "fsconfig", "fsmount", "fspick", "move_mount", "open_tree", "mount_setattr",
    "open_by_handle_at", "name_to_handle_at",
    # kernel attack surface with no use here (io_uring would also bypass the socket rule)
    "keyctl", "add_key", "request_key", "bpf", "perf_event_open", "userfaultfd",
    "io_uring_setup", "io_uring_enter", "io_uring_register",
    "kexec_load", "kexec_file_load", "init_module", "finit_module", "delete_module",
    "create_module", "query_module", "get_kernel_syms",
    "acct", "swapon", "swapoff", "reboot", "syslog", "quotactl", "quotactl_fd",
    "lookup_dcookie", "fanotify_init", "iopl", "ioperm", "vhangup", "nfsservctl",
    "uselib", "ustat", "sysfs", "_sysctl", "vm86", "vm86old",
    # clocks
    "settimeofday", "stime", "clock_settime", "clock_adjtime", "adjtimex",
)
# fmt: on

_NAMESPACE_FLAGS = (
    0x00020000,  # CLONE_NEWNS
    0x02000000,  # CLONE_NEWCGROUP
    0x04000000,  # CLONE_NEWUTS
    0x08000000,  # CLONE_NEWIPC
    0x10000000,  # CLONE_NEWUSER
    0x20000000,  # CLONE_NEWPID
    0x40000000,  # CLONE_NEWNET
    # CLONE_NEWTIME (0x80) is only accepted by clone3 and unshare, both refused.
)
_TIOCSTI = 0x5412
_TIOCLINUX = 0x541C
_AF_UNIX, _AF_INET, _AF_INET6, _AF_NETLINK = 1, 2, 10, 16


def seccomp_available() -> bool:
    """True when libseccomp loads, the kernel filters syscalls and a filter compiles."""
    return _probe() is None


def seccomp_unavailable_reason() -> str | None:
    """Why ``seccomp_available()`` is False (for logs and /health), else None."""
    return _probe()


@functools.cache
def _probe() -> str | None:
    if not _kernel_has_seccomp():
        return "the kernel has no seccomp filter support"
    try:
        compile_filter(allow_inet=False)
    except ImportError:
        return "pyseccomp is not installed (pip install pyseccomp)"
    except OSError as exc:  # libseccomp2 missing, or it refused the filter
        return f"libseccomp failed: {exc} (install the libseccomp2 package)"
    return None


def _kernel_has_seccomp() -> bool:
    try:
        with open("/proc/self/status", encoding="ascii", errors="replace") as f:
            return any(line.startswith("Seccomp:") for line in f)
    except OSError:
        return False


@functools.cache
def compile_filter(*, allow_inet: bool) -> bytes:
    """The BPF program (``struct sock_filter`` array) for bwrap ``--seccomp``.

    Raises ImportError (no pyseccomp) or OSError (no libseccomp2, or it failed).
    """
    f = _build(allow_inet)
    with tempfile.TemporaryFile() as tmp:
        f.export_bpf(tmp)
        tmp.seek(0)
        data = tmp.read()
    if not data or len(data) % 8:
        raise OSError(errno.EINVAL, f"libseccomp exported {len(data)} bytes of BPF")
    return data


def describe_filter(*, allow_inet: bool) -> str:
    """libseccomp's readable rendering of the filter (debugging, tests)."""
    f = _build(allow_inet)
    with tempfile.TemporaryFile() as tmp:
        f.export_pfc(tmp)
        tmp.seek(0)
        return tmp.read().decode()


def _build(allow_inet: bool) -> Any:
    sc = _import_pyseccomp()
    f = sc.SyscallFilter(sc.ALLOW)
    f.set_attr(sc.Attr.ACT_BADARCH, sc.KILL_PROCESS)
    eperm = sc.ERRNO(errno.EPERM)
    for name in DENIED_SYSCALLS:
        _add(sc, f, eperm, name)
    # glibc falls back to clone() on ENOSYS, whose flags a filter can read.
    _add(sc, f, sc.ERRNO(errno.ENOSYS), "clone3")
    for flag in _NAMESPACE_FLAGS:
        _add(sc, f, eperm, "clone", sc.Arg(0, sc.MASKED_EQ, flag, flag))
    for request in (_TIOCSTI, _TIOCLINUX):  # the kernel reads the request as 32 bits
        _add(sc, f, eperm, "ioctl", sc.Arg(1, sc.MASKED_EQ, 0xFFFFFFFF, request))
    # Only PER_LINUX: no ADDR_NO_RANDOMIZE, READ_IMPLIES_EXEC, ... (queries refused too).
    _add(sc, f, eperm, "personality", sc.Arg(0, sc.NE, 0))
    allowed = (_AF_UNIX, _AF_INET, _AF_INET6, _AF_NETLINK) if allow_inet else (_AF_UNIX,)
    _refuse_socket_families(sc, f, allowed)
    return f


def _import_pyseccomp() -> Any:
    try:
        import pyseccomp  # type: ignore[import-untyped]
    except (RuntimeError, AttributeError) as exc:  # pyseccomp's errors for a missing .so
        raise OSError(errno.ENOENT, f"libseccomp could not be loaded ({exc})") from exc
    return pyseccomp


def _refuse_socket_families(sc: Any, f: Any, allowed: tuple[int, ...]) -> None:
    # libseccomp allows one comparison per argument in a rule, so refuse every
    # family between the allowed ones one by one, then everything above.
    # A value with high bits set is >= the last allowed one, so it is refused.
    action = sc.ERRNO(errno.EAFNOSUPPORT)
    below = 0
    for family in sorted(allowed):
        for refused in range(below, family):
            _add(sc, f, action, "socket", sc.Arg(0, sc.EQ, refused))
        below = family + 1
    _add(sc, f, action, "socket", sc.Arg(0, sc.GE, below))


def _add(sc: Any, f: Any, action: int, name: str, *args: Any) -> None:
    nr = sc.resolve_syscall(sc.Arch.NATIVE, name)
    if nr < 0:  # no such syscall on this architecture
        return
    f.add_rule(action, nr, *args)
