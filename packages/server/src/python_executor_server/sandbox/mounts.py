"""Host-side mount helpers (root only): mount(2)/umount2(2) without a subprocess.

Usage::

    mount("tmpfs", path, "tmpfs", MS_NOSUID | MS_NODEV, "size=64m,mode=0700")
    bind_readonly(Path("/root/.pyenv/versions/3.12.1"), alias)
    unmount(path)          # lazily when busy; fine when it is not mounted
    remove_tree(path)      # unmount what is below, then remove it
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import shutil
import stat
from pathlib import Path

MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MS_REMOUNT = 32
MS_BIND = 4096
MNT_DETACH = 2

_libc = ctypes.CDLL(None, use_errno=True)


def _check(rc: int, target: Path | str) -> None:
    if rc != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), str(target))


def mount(source: str, target: Path, fstype: str | None, flags: int, data: str = "") -> None:
    rc = _libc.mount(
        source.encode(),
        os.fsencode(target),
        fstype.encode() if fstype else None,
        ctypes.c_ulong(flags),
        data.encode() if data else None,
    )
    _check(rc, target)


def bind_readonly(source: Path, target: Path) -> None:
    """A read-only, nosuid, nodev bind mount of ``source`` on ``target``."""
    mount(str(source), target, None, MS_BIND)
    flags = MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV
    try:
        mount("none", target, None, flags)
    except OSError:
        unmount(target)
        raise


def unmount(target: Path) -> None:
    """Unmount ``target``; lazily when busy. Not mounted or missing: nothing to do."""
    rc = _libc.umount2(os.fsencode(target), 0)
    if rc == 0:
        return
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOENT):
        return
    if err != errno.EBUSY:
        raise OSError(err, os.strerror(err), str(target))
    _check(_libc.umount2(os.fsencode(target), MNT_DETACH), target)


def mountinfo() -> list[tuple[Path, str, list[str]]]:
    """(mount point, fs type, super options) of every mount we can see."""
    mounts = []
    with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as f:
        for line in f:
            pre, _, post = line.partition(" - ")
            fields = post.split()
            if len(fields) >= 3:
                point = Path(pre.split()[4].replace("\\040", " "))
                mounts.append((point, fields[0], fields[2].split(",")))
    return mounts


def mount_points_under(directory: Path) -> list[Path]:
    """Mount points strictly below ``directory``, deepest first."""
    found = {point for point, _, _ in mountinfo() if directory in point.parents}
    return sorted(found, key=lambda p: len(p.parts), reverse=True)


def remove_tree(directory: Path) -> None:
    """Unmount whatever is mounted below ``directory``, then remove it, unless a mount
    is still there: never through a live (bind) mount."""
    for point in mount_points_under(directory):
        with contextlib.suppress(OSError):
            unmount(point)
    if not mount_points_under(directory):
        shutil.rmtree(directory, ignore_errors=True)


def traversable_by(path: Path, uid: int, gid: int) -> bool:
    """Whether ``uid``/``gid`` (no supplementary groups) can reach ``path``:
    execute permission on every ancestor directory. ACLs are not consulted."""
    for ancestor in reversed(path.parents):
        try:
            st = ancestor.stat()
        except OSError:
            return False
        if st.st_uid == uid:
            bit = stat.S_IXUSR
        elif st.st_gid == gid:
            bit = stat.S_IXGRP
        else:
            bit = stat.S_IXOTH
        if not st.st_mode & bit:
            return False
    return True


# The new mount API (Linux 5.2+; the same syscall numbers on every architecture).
_FSOPEN, _FSCONFIG, _FSMOUNT = 430, 431, 432
_FSCONFIG_SET_STRING, _FSCONFIG_CMD_CREATE = 1, 6
MOUNT_ATTR_NOSUID, MOUNT_ATTR_NODEV = 0x2, 0x4
_libc.syscall.restype = ctypes.c_long


def _syscall(what: str, *args: object) -> int:
    rc = int(_libc.syscall(*args))
    if rc < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")
    return rc


def detached_tmpfs(options: dict[str, str], attributes: int) -> int:
    """A tmpfs mounted nowhere yet (fsopen/fsconfig/fsmount): an fd for its root that a
    process in another mount namespace can attach with move_mount. Its files are reached
    through ``/proc/self/fd/<fd>/`` meanwhile; it is freed when no fd nor mount holds it."""
    context = _syscall("fsopen tmpfs", _FSOPEN, b"tmpfs", 1)  # FSOPEN_CLOEXEC
    try:
        for key, value in options.items():
            args = (context, _FSCONFIG_SET_STRING, key.encode(), value.encode(), 0)
            _syscall(f"fsconfig {key}", _FSCONFIG, *args)
        _syscall("fsconfig create", _FSCONFIG, context, _FSCONFIG_CMD_CREATE, None, None, 0)
        return _syscall("fsmount", _FSMOUNT, context, 1, attributes)  # FSMOUNT_CLOEXEC
    finally:
        os.close(context)
