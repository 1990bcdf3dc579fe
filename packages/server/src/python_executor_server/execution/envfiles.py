"""File-level helpers of the environment cache: advisory locks shared across processes,
publishing an installed tree, measuring it.

Usage::

    fd = await flock(lock_path, fcntl.LOCK_EX)     # polls: the holder may be another process
    publish_tree(staging, chown=True)
"""

from __future__ import annotations

import fcntl
import os
import stat
import time
from pathlib import Path

import anyio

POLL_SECONDS = 0.05


def try_flock(path: Path, mode: int) -> int | None:
    """An fd holding ``mode`` on ``path``; None when busy or when the file was replaced
    (eviction unlinks lock files: a lock on an unlinked inode protects nothing)."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except FileNotFoundError:
        return None
    try:
        fcntl.flock(fd, mode | fcntl.LOCK_NB)
        if os.fstat(fd).st_ino == os.stat(path).st_ino:
            return fd
    except (BlockingIOError, FileNotFoundError):
        pass
    os.close(fd)
    return None


async def flock(path: Path, mode: int) -> int:
    # Polling: the holder may be another process, which no in-process event can signal.
    while (fd := try_flock(path, mode)) is None:  # noqa: ASYNC110
        await anyio.sleep(POLL_SECONDS)
    return fd


def make_dir(path: Path) -> bool:
    """Create ``path`` (and parents); whether this call created it (others may race)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        path.mkdir()
    except FileExistsError:
        return False
    return True


def touch(path: Path) -> None:
    path.touch(exist_ok=True)
    os.utime(path)


def mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return time.time()


def listdir(path: Path) -> list[Path]:
    try:
        return list(path.iterdir())
    except OSError:
        return []


def publish_tree(top: Path, *, chown: bool) -> None:
    """Readable by everyone (the sandbox uid), writable by nobody but us: whatever the
    installer's umask was, and (``chown``) taken back from the installer's uid."""
    uid, gid = os.getuid(), os.getgid()
    for dirpath, _, filenames in os.walk(top):
        for path in (dirpath, *(os.path.join(dirpath, name) for name in filenames)):
            st = os.lstat(path)
            if chown and st.st_uid != uid:
                os.lchown(path, uid, gid)
            if stat.S_ISLNK(st.st_mode):
                continue
            executable = stat.S_ISDIR(st.st_mode) or st.st_mode & stat.S_IXUSR
            mode = (stat.S_IMODE(st.st_mode) | 0o444 | (0o111 if executable else 0)) & ~0o022
            if mode != stat.S_IMODE(st.st_mode):
                os.chmod(path, mode)


def disk_usage(root: Path) -> int:
    total = 0
    for dirpath, dirnames, filenames in os.walk(root):
        for name in (*dirnames, *filenames):
            try:
                total += os.lstat(os.path.join(dirpath, name)).st_blocks * 512
            except OSError:
                continue
    return total
