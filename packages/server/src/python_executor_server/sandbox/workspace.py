"""Per-run workspaces: one size-capped tmpfs holding the run's /work and /tmp.

``runs_path/<execution_id>/`` is a tmpfs (as root) of ``disk_mb`` MiB owned by
the sandbox uid, mode 0700; ``work/`` appears at /work and ``tmp/`` at /tmp,
so both together are capped and a write past the cap fails with ENOSPC inside
the sandbox while the host disk is never touched. Its inode count is capped
too. Without root it is a plain directory and the cap is not enforced.

tmpfs pages are memory: the kernel charges them to the memory cgroup of the
process that wrote them, so what a run writes counts towards its memory limit.

Usage::

    ws = Workspaces(settings.runs_path, uid=1000, tmpfs=True, min_inodes=...)
    work = ws.create("exe_...", disk_mb=2048)    # -> runs_path/exe_.../work
    chown_tree(work, 1000, 1000)
    ws.remove(work)
"""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path

from ..errors import SandboxError
from .mounts import (
    MOUNT_ATTR_NODEV,
    MOUNT_ATTR_NOSUID,
    MS_NODEV,
    MS_NOSUID,
    detached_tmpfs,
    mount,
    unmount,
)

WORK_DIR = "work"
TMP_DIR = "tmp"
INODES_PER_MB = 64
FEW_INODES = 32  # see holds_little
DETACHED_PREFIX = "/proc/self/fd/"  # create_detached: a workspace reached through its fd
POOL_PREFIX = "pool-"  # pool-<server pid>-<random>-<n>: a pre-started sandbox's workspace


class Workspaces:
    def __init__(self, runs_path: Path, *, uid: int, tmpfs: bool, min_inodes: int) -> None:
        self.runs_path = runs_path
        self.uid = uid
        self.tmpfs = tmpfs
        self.min_inodes = min_inodes
        self._detached: dict[Path, int] = {}  # create_detached: workdir -> its tmpfs fd

    def create(self, execution_id: str, disk_mb: int) -> Path:
        root = self._root_for(execution_id)
        root.mkdir(mode=0o700)
        try:
            if self.tmpfs:
                options = ",".join(f"{k}={v}" for k, v in self._options(disk_mb).items())
                mount("tmpfs", root, "tmpfs", MS_NOSUID | MS_NODEV, options)
            self._populate(root)
        except BaseException:
            self.remove(root / WORK_DIR)
            raise
        return root / WORK_DIR

    def create_detached(self, disk_mb: int) -> tuple[int, Path]:
        """The same workspace as a tmpfs mounted nowhere (as root): its fd, for a sandbox
        to attach in its own mount namespace, and the path of its ``work`` dir meanwhile
        (through the fd, which ``remove`` closes: the path is unique until then)."""
        options = {"source": "tmpfs", **self._options(disk_mb)}
        fd = detached_tmpfs(options, MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV)
        root = f"{DETACHED_PREFIX}{fd}"
        work = Path(f"{root}/{WORK_DIR}")
        self._detached[work] = fd
        try:
            self._populate(root)
        except BaseException:
            self.remove(work)
            raise
        return fd, work

    def _options(self, disk_mb: int) -> dict[str, str]:
        inodes = max(self.min_inodes, disk_mb * INODES_PER_MB)
        uid = str(self.uid)
        return {
            "size": f"{disk_mb}m",
            "nr_inodes": str(inodes),
            "mode": "0700",
            "uid": uid,
            "gid": uid,
        }

    def _populate(self, root: str | Path) -> None:
        work, tmp = os.path.join(root, WORK_DIR), os.path.join(root, TMP_DIR)  # (per run)
        os.mkdir(work, mode=0o755)
        os.mkdir(tmp, mode=0o777)
        os.chmod(tmp, 0o1777)
        if os.geteuid() == 0:
            for path in (root, work, tmp):
                os.chown(path, self.uid, self.uid)

    def tmp_for(self, workdir: Path) -> Path:
        return workdir.parent / TMP_DIR

    def remove(self, workdir: Path) -> None:
        if str(workdir).startswith(DETACHED_PREFIX):
            fd = self._detached.pop(workdir, None)  # its path is valid until now
            if fd is not None:
                os.close(fd)  # freed with the last mount of it (the sandbox's)
            return
        root = workdir.parent if workdir.name == WORK_DIR else workdir
        if root.parent.resolve() != self.runs_path.resolve() or root.name.startswith("."):
            raise SandboxError(f"not a workspace of this backend: {workdir}")
        if not root.exists():
            return
        if self.tmpfs:
            unmount(root)
        try:
            root.rmdir()  # the usual case: an empty mount point once its tmpfs is gone
        except FileNotFoundError:
            return
        except OSError:
            shutil.rmtree(root, ignore_errors=True)
            with contextlib.suppress(FileNotFoundError):
                root.rmdir()

    def holds_little(self, workdir: Path) -> bool:
        """Whether a workspace has so few files that walking or removing it costs less
        than handing the work to a thread (a tmpfs counts its inodes: one statvfs)."""
        if not self.tmpfs:
            return False
        try:
            st = os.statvfs(workdir)
        except OSError:
            return False
        return st.f_files - st.f_ffree <= FEW_INODES

    def reap_stale(self) -> None:
        """Remove the pooled workspaces of servers that died (their sandboxes died with
        them: bwrap runs with --die-with-parent)."""
        for root in self.runs_path.glob(POOL_PREFIX + "*"):
            owner = root.name.removeprefix(POOL_PREFIX).split("-", 1)[0]
            if owner.isdigit() and not Path(f"/proc/{owner}").exists():
                self.remove(root)

    def _root_for(self, execution_id: str) -> Path:
        if not execution_id or "/" in execution_id or execution_id.startswith("."):
            raise SandboxError(f"invalid execution id for a workspace: {execution_id!r}")
        return self.runs_path / execution_id


def chown_tree(top: Path, uid: int, gid: int) -> None:
    """Give the sandbox user what the runner wrote as root. Walks by directory fd and
    never follows a symlink, so a link planted by an earlier run cannot redirect it."""
    if os.lstat(top).st_uid != uid:
        os.lchown(top, uid, gid)
    for _, dirnames, filenames, dirfd in os.fwalk(top, follow_symlinks=False):
        for name in (*dirnames, *filenames):
            if os.stat(name, dir_fd=dirfd, follow_symlinks=False).st_uid != uid:
                os.chown(name, uid, gid, dir_fd=dirfd, follow_symlinks=False)
