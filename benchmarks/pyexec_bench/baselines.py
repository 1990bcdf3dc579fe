"""Baselines measured in the same run: a bare interpreter start, a cold bwrap sandbox
around it (as the sandbox uid), a Docker container per run, and bare starts in parallel.

Usage::

    exe = interpreter_for("3.12")
    ms = time_command([str(exe), "-I", "-S", "-c", "pass"], count=40, seconds=10)
    with BwrapCold(exe) as cold:
        ms = time_command(cold.argv, count=30, seconds=10)
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
import threading
import time
import uuid
from pathlib import Path
from types import TracebackType

from .stats import bounded

PASS = ["-I", "-S", "-c", "pass"]
RUN_TIMEOUT = 60.0
SYSTEM_PYTHON = Path("/usr/bin/python3")


@functools.cache
def _server_interpreters() -> dict[str, Path]:
    """What the server itself discovers (same search order), or {} when it cannot say."""
    try:
        from python_executor_server.execution.interpreters import discover_interpreters
        from python_executor_server.settings import Settings

        found = discover_interpreters(Settings())
    except Exception:  # an older or newer server layout: fall back to PATH
        return {}
    return {version: Path(interp.executable) for version, interp in found.items()}


def interpreter_for(version: str) -> Path | None:
    found = _server_interpreters().get(version)
    if found is not None:
        return found
    which = shutil.which(f"python{version}")
    return Path(which) if which else None


def time_once(argv: list[str]) -> float:
    """Wall milliseconds of one run of ``argv``; raises when it fails."""
    started = time.perf_counter()
    done = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, timeout=RUN_TIMEOUT)
    elapsed = (time.perf_counter() - started) * 1000
    if done.returncode != 0:
        err = done.stderr.decode(errors="replace").strip().splitlines()
        raise RuntimeError(f"{argv[0]} exited {done.returncode}: {err[-1] if err else ''}")
    return elapsed


def time_command(argv: list[str], count: int, seconds: float, warmup: int = 3) -> list[float]:
    for _ in bounded(warmup, seconds / 4):
        time_once(argv)
    return [time_once(argv) for _ in bounded(count, seconds)]


def parallel_rate(argv: list[str], workers: int, seconds: float, cap: int = 100_000) -> float:
    """Completed runs per second with ``workers`` threads each starting ``argv`` in a loop."""
    done = [0] * workers
    deadline = time.monotonic() + seconds

    def loop(slot: int) -> None:
        while time.monotonic() < deadline and done[slot] < cap:
            time_once(argv)
            done[slot] += 1

    started = time.monotonic()
    threads = [threading.Thread(target=loop, args=(i,)) for i in range(workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sum(done) / (time.monotonic() - started)


def python_version_of(exe: Path) -> str:
    done = subprocess.run(
        [str(exe), "-I", "-S", "-c", "import sys;print(sys.version.split()[0])"],
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT,
        check=True,
    )
    return done.stdout.strip()


class BwrapCold:
    """bwrap with fresh user/pid/ipc/uts/net/cgroup namespaces around ``exe -I -S -c pass``,
    started as the sandbox uid when we are root. An interpreter that uid cannot reach (pyenv
    under /root, mode 0700) is shown through a read-only bind alias, as the server does;
    when that is impossible, /usr/bin/python3 is measured instead (``self.note`` says so)."""

    def __init__(self, exe: Path, uid: int = 1000) -> None:
        self.exe = exe
        self.uid = uid
        self.root = os.geteuid() == 0
        self.alias: Path | None = None
        self.note = ""
        self.argv: list[str] = []
        self.measured = exe  # the interpreter actually started

    def __enter__(self) -> BwrapCold:
        bwrap = shutil.which("bwrap")
        if bwrap is None:
            raise RuntimeError("bubblewrap is not installed")
        exe, binds = self._reachable_interpreter()
        self.measured = exe
        self.argv = [*self._launcher(), bwrap, *self._namespaces(), *self._fs(binds)]
        self.argv += ["--chdir", "/tmp", "--", str(exe), *PASS]
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self.alias is not None:
            subprocess.run(["umount", str(self.alias)], capture_output=True, check=False)
            shutil.rmtree(self.alias.parent, ignore_errors=True)

    def _launcher(self) -> list[str]:
        if not self.root:
            return []
        setpriv = shutil.which("setpriv") or "setpriv"
        return [setpriv, f"--reuid={self.uid}", f"--regid={self.uid}", "--clear-groups", "--"]

    @staticmethod
    def _namespaces() -> list[str]:
        args = ["--unshare-user", "--uid", "1000", "--gid", "1000", "--unshare-pid"]
        args += ["--unshare-ipc", "--unshare-uts", "--unshare-net", "--unshare-cgroup-try"]
        return [*args, "--die-with-parent", "--new-session", "--cap-drop", "ALL", "--clearenv"]

    @staticmethod
    def _fs(binds: list[str]) -> list[str]:
        args = ["--ro-bind", "/usr", "/usr"]
        for name in ("bin", "sbin", "lib", "lib32", "lib64", "libx32"):
            path = Path("/") / name
            if path.is_symlink():
                args += ["--symlink", os.readlink(path), str(path)]
            elif path.exists():
                args += ["--ro-bind", str(path), str(path)]
        if Path("/etc/ld.so.cache").exists():
            args += ["--ro-bind", "/etc/ld.so.cache", "/etc/ld.so.cache"]
        return [*args, "--proc", "/proc", "--dev", "/dev", "--tmpfs", "/tmp", *binds]

    def _reachable_interpreter(self) -> tuple[Path, list[str]]:
        prefix = self.exe.parent.parent
        if str(self.exe).startswith("/usr/"):
            return self.exe, []
        if not self.root or self._uid_can_run(self.exe):
            return self.exe, ["--ro-bind", str(prefix), str(prefix)]
        alias = self._bind_alias(prefix)
        if alias is not None:
            self.note = f"{prefix} shown read-only through a bind alias (as the server does)"
            return self.exe, ["--ro-bind", str(alias), str(prefix)]
        self.note = f"{self.exe} is not reachable as uid {self.uid}: measured {SYSTEM_PYTHON}"
        return SYSTEM_PYTHON, []

    def _uid_can_run(self, exe: Path) -> bool:
        argv = [*self._launcher(), "/usr/bin/test", "-x", str(exe)]
        return subprocess.run(argv, capture_output=True, check=False).returncode == 0

    def _bind_alias(self, prefix: Path) -> Path | None:
        parent = Path("/run") / f"pyexec-bench-alias-{uuid.uuid4().hex[:8]}"
        alias = parent / "prefix"
        alias.mkdir(parents=True)
        os.chmod(parent, 0o711)
        steps = [
            ["mount", "--bind", str(prefix), str(alias)],
            ["mount", "-o", "remount,bind,ro,nosuid,nodev", str(alias)],
        ]
        for step in steps:
            if subprocess.run(step, capture_output=True, check=False).returncode != 0:
                subprocess.run(["umount", str(alias)], capture_output=True, check=False)
                shutil.rmtree(parent, ignore_errors=True)
                return None
        self.alias = alias
        return alias


def docker_ready(image: str) -> str | None:
    """None when ``docker run image`` can work here, else the reason it cannot."""
    docker = shutil.which("docker")
    if docker is None:
        return "no docker CLI"
    try:
        info = subprocess.run([docker, "info"], capture_output=True, timeout=15, check=False)
        if info.returncode != 0:
            return "no Docker engine answers (`docker info` failed)"
        found = subprocess.run(
            [docker, "image", "inspect", image], capture_output=True, timeout=15, check=False
        )
    except subprocess.TimeoutExpired:
        return "the Docker engine did not answer in 15 s"
    return None if found.returncode == 0 else f"image {image} not present (make docker-image)"


def docker_argv(image: str) -> list[str]:
    docker = shutil.which("docker") or "docker"
    return [docker, "run", "--rm", "--network", "none", image, "python3", "-c", "pass"]
