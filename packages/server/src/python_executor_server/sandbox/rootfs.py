"""What the sandbox sees of the filesystem, as bwrap arguments.

A read-only /usr (and the host's /bin, /lib ... links), a minimal /etc (our
own passwd, group, hosts, nsswitch.conf; the host's dynamic-linker cache,
certificates, time zone; never shadow nor the host's users), fresh /proc and
/dev, a small /dev/shm, the interpreter's prefix read-only at its own path
with every host site-packages directory masked by an empty one.

The sandbox uid cannot reach paths below a directory it may not traverse
(pyenv interpreters under /root, mode 0700). As root we bind such a path
read-only to an alias under our state directory, which it can reach, and show
the alias at the original path (pyenv builds find libpython by absolute rpath).

Usage::

    rootfs = RootFs(state_dir, uid=1000, can_mount=True)
    rootfs.setup()
    args = rootfs.base_args() + rootfs.interpreter_args(interp) + rootfs.mount_args(spec.mounts)
    rootfs.close()
"""

from __future__ import annotations

import contextlib
import glob
import os
from collections.abc import Iterable
from pathlib import Path

from .base import SANDBOX_GID, SANDBOX_UID, SANDBOX_WORKDIR, Interpreter, Mount
from .instance import stale_instances
from .mounts import MS_BIND, bind_readonly, mount, remove_tree, traversable_by, unmount

HOSTNAME = "sandbox"
DEV_SHM_BYTES = 64 * 1024 * 1024
NAMESERVER = "10.0.2.3"  # slirp4netns' built-in DNS forwarder
HOST_ETC = (
    "ld.so.cache", "ld.so.conf", "ld.so.conf.d", "localtime", "timezone", "ssl",
    "ca-certificates", "ca-certificates.conf", "alternatives", "protocols", "services",
    "mime.types", "gai.conf", "host.conf", "os-release",
)  # fmt: skip
HOST_LINKS = ("bin", "sbin", "lib", "lib32", "lib64", "libx32")
GLOBAL_SITE_GLOBS = (
    "/usr/lib/python3/dist-packages",
    "/usr/lib/python3*/site-packages",
    "/usr/lib/python3*/dist-packages",
    "/usr/local/lib/python3*/site-packages",
    "/usr/local/lib/python3*/dist-packages",
)


def generated_etc(network: bool = False) -> dict[str, str]:
    files = {
        "passwd": (
            "root:x:0:0:root:/root:/usr/sbin/nologin\n"
            f"sandbox:x:{SANDBOX_UID}:{SANDBOX_GID}:sandbox:{SANDBOX_WORKDIR}:/bin/sh\n"
            "nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n"
        ),
        "group": f"root:x:0:\nsandbox:x:{SANDBOX_GID}:\nnogroup:x:65534:\n",
        "hosts": f"127.0.0.1\tlocalhost {HOSTNAME}\n::1\tlocalhost ip6-localhost ip6-loopback\n",
        "hostname": f"{HOSTNAME}\n",
        "nsswitch.conf": "passwd: files\ngroup: files\nhosts: files dns\nnetworks: files\n",
    }
    if network:
        files["resolv.conf"] = f"nameserver {NAMESERVER}\n"
    return files


def _under(path: Path, top: str) -> bool:
    return path == Path(top) or Path(top) in path.parents


class RootFs:
    def __init__(self, state_dir: Path, *, uid: int, can_mount: bool) -> None:
        self.state_dir = state_dir  # <runs_path>/.sandbox/<instance>, reachable by uid
        self.uid = uid
        self.can_mount = can_mount
        self._aliases: dict[tuple[Path, bool], Path] = {}
        self._base: list[str] = []

    def setup(self) -> None:
        reap_stale_state(self.state_dir.parent)
        for d in (self.state_dir.parent, self.state_dir, self._etc, self._empty, self._hosts):
            d.mkdir(mode=0o711, exist_ok=True)
            os.chmod(d, 0o711 if d != self._empty else 0o555)
        for name, text in generated_etc(network=True).items():
            (self._etc / name).write_text(text)
            os.chmod(self._etc / name, 0o644)
        self._base = self._build_base()

    @property
    def _etc(self) -> Path:
        return self.state_dir / "etc"

    @property
    def _empty(self) -> Path:
        return self.state_dir / "empty"

    @property
    def _hosts(self) -> Path:
        return self.state_dir / "hosts"

    def _build_base(self) -> list[str]:
        args = ["--ro-bind", "/usr", "/usr"]
        for name in HOST_LINKS:
            args += _mirror(Path("/") / name)
        for name in generated_etc():
            args += ["--ro-bind", str(self._etc / name), f"/etc/{name}"]
        for name in HOST_ETC:
            args += _mirror(Path("/etc") / name)
        sites = sorted({p for pattern in GLOBAL_SITE_GLOBS for p in glob.glob(pattern)})
        args += self._masks(Path(p) for p in sites)
        args += ["--proc", "/proc", "--dev", "/dev"]
        args += ["--perms", "1777", "--size", str(DEV_SHM_BYTES), "--tmpfs", "/dev/shm"]
        args += ["--remount-ro", "/dev"]  # bwrap's /dev is an uncapped tmpfs otherwise
        return args

    def _masks(self, dirs: Iterable[Path]) -> list[str]:
        args: list[str] = []
        for d in dirs:
            if d.is_dir():
                args += ["--ro-bind", str(self._empty), str(d)]
        return args

    def base_args(self, *, network: bool) -> list[str]:
        extra = ["--ro-bind", str(self._etc / "resolv.conf"), "/etc/resolv.conf"] if network else []
        return self._base + extra

    def interpreter_args(self, interp: Interpreter) -> list[str]:
        args: list[str] = []
        prefix = interp.prefix
        if not _under(prefix, "/usr"):
            args += ["--ro-bind", str(self.visible(prefix)), str(prefix)]
        exe = interp.executable
        if not _under(exe, "/usr") and not _under(exe, str(prefix)):
            args += ["--ro-bind", str(self.visible(exe)), str(exe)]
        lib = prefix / "lib"
        v = interp.version
        sites = [lib / f"python{v}/site-packages", lib / f"python{v}/dist-packages"]
        sites += [prefix / f"local/lib/python{v}/dist-packages", lib / "python3/dist-packages"]
        return args + self._masks(sites)

    def mount_args(self, mounts: Iterable[Mount]) -> list[str]:
        args: list[str] = []
        for m in mounts:
            flag = "--bind" if m.writable else "--ro-bind"
            args += [flag, str(self.visible(m.source, writable=m.writable)), m.target]
        return args

    def visible(self, path: Path, *, writable: bool = False) -> Path:
        """``path`` itself when the sandbox uid can reach it, else an alias it can
        reach (a bind mount, read-only unless ``writable``)."""
        path = path.absolute()
        if not self.can_mount or traversable_by(path, self.uid, self.uid):
            return path
        alias = self._aliases.get((path, writable))
        if alias is None:
            alias = self._hosts / str(len(self._aliases))
            if path.is_dir():
                alias.mkdir(exist_ok=True)
            else:
                alias.touch(exist_ok=True)
            if writable:
                mount(str(path), alias, None, MS_BIND)
            else:
                bind_readonly(path, alias)
            self._aliases[(path, writable)] = alias
        return alias

    def close(self) -> None:
        for alias in self._aliases.values():
            with contextlib.suppress(OSError):
                unmount(alias)
        self._aliases.clear()
        remove_tree(self.state_dir)


def _mirror(path: Path) -> list[str]:
    """bwrap arguments reproducing a host path: the same symlink, or a read-only bind."""
    if path.is_symlink():
        return ["--symlink", os.readlink(path), str(path)]
    if path.exists():
        return ["--ro-bind", str(path), str(path)]
    return []


def reap_stale_state(parent: Path) -> None:
    """Remove ``parent/<pid>-*`` state directories left by a server that died."""
    for d in stale_instances(parent):
        remove_tree(d)
