"""The server under test: a real `python-executor-server serve` on a free loopback
port with a throw-away data dir, or one already running (``--server URL``).

Usage::

    with managed_server(extra_env={}) as server:    # or attached_server("http://...")
        server.url, server.pid, server.health
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx2

from .procmem import pid_listening_on

SERVER_BIN = Path(sys.executable).with_name("python-executor-server")
START_TIMEOUT = 90.0
# A 1 GiB tar's multipart body is a few hundred bytes over the default 1 GiB limit.
UPLOAD_LIMIT = 2 * 1024 * 1024 * 1024
STOP_TIMEOUT = 30.0


@dataclass
class Server:
    url: str
    pid: int | None
    managed: bool
    health: dict[str, Any] = field(default_factory=dict)
    start_seconds: float | None = None
    data_dir: Path | None = None

    def as_dict(self) -> dict[str, Any]:
        start = None if self.start_seconds is None else round(self.start_seconds, 2)
        fields = {"url": self.url, "pid": self.pid, "managed": self.managed}
        return fields | {"start_seconds": start, "health": self.health}

    @property
    def default_python(self) -> str | None:
        value = self.health.get("default_python")
        return str(value) if value else None

    @property
    def python_versions(self) -> list[str]:
        return [str(v) for v in self.health.get("python_versions", [])]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def get_health(url: str, timeout: float = 5.0) -> dict[str, Any]:
    response = httpx2.get(url + "/health", timeout=timeout, trust_env=False)
    response.raise_for_status()
    body: dict[str, Any] = response.json()
    return body


@contextlib.contextmanager
def attached_server(url: str) -> Iterator[Server]:
    url = url.rstrip("/")
    port = urlsplit(url).port or 80
    yield Server(url=url, pid=pid_listening_on(port), managed=False, health=get_health(url))


@contextlib.contextmanager
def managed_server(extra_env: Mapping[str, str]) -> Iterator[Server]:
    tag = uuid.uuid4().hex[:8]
    top = Path(tempfile.mkdtemp(prefix=f"pyexec-bench-{tag}-"))
    env = _server_env(tag, top, extra_env)
    log_path = top / "server.log"
    proc: subprocess.Popen[bytes] | None = None
    try:
        with open(log_path, "ab") as log:
            started = time.monotonic()
            proc = subprocess.Popen([str(SERVER_BIN), "serve"], env=env, stdout=log, stderr=log)
        url = f"http://127.0.0.1:{env['PYEXEC_PORT']}"
        health = _wait_healthy(url, proc, log_path)
        server = Server(url, proc.pid, True, health, time.monotonic() - started, top / "data")
        yield server
    finally:
        if proc is not None:
            _stop(proc)
        _report_server_errors(log_path)
        _cleanup(tag, top, Path(env["PYEXEC_RUN_DIR"]))


def _server_env(tag: str, top: Path, extra_env: Mapping[str, str]) -> dict[str, str]:
    root = os.geteuid() == 0
    return {
        **os.environ,
        "PYEXEC_HOST": "127.0.0.1",
        "PYEXEC_PORT": str(free_port()),
        "PYEXEC_DATA_DIR": str(top / "data"),
        "PYEXEC_RUN_DIR": f"/run/pyexec-bench-{tag}" if root else str(top / "runs"),
        "PYEXEC_CGROUP_ROOT": f"pyexec-bench-{tag}",
        "PYEXEC_LOG_LEVEL": "warning",
        "PYEXEC_MAX_UPLOAD_BYTES": str(UPLOAD_LIMIT),
        **extra_env,
    }


def _wait_healthy(url: str, proc: subprocess.Popen[bytes], log_path: Path) -> dict[str, Any]:
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode}:\n{_tail(log_path)}")
        if "Application startup failed" in _tail(log_path):
            raise RuntimeError(f"the server failed to start:\n{_tail(log_path)}")
        with contextlib.suppress(httpx2.TransportError, httpx2.HTTPStatusError):
            return get_health(url, timeout=1)
        time.sleep(0.05)
    raise RuntimeError(f"the server did not become healthy in {START_TIMEOUT:.0f} s")


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _cleanup(tag: str, top: Path, run_dir: Path) -> None:
    """Our temp dirs (after unmounting what a killed server left in them, never through a
    live mount) and the empty cgroups the server left."""
    for path in (run_dir, top):
        for point in _mounts_under(path):
            subprocess.run(["umount", "--lazy", point], capture_output=True, check=False)
        if path.exists() and not _mounts_under(path):
            shutil.rmtree(path, ignore_errors=True)
    cgroup_fs = Path("/sys/fs/cgroup")
    hierarchies = [cgroup_fs, *(p for p in cgroup_fs.glob("*") if p.is_dir())]
    for hierarchy in hierarchies:
        _remove_empty_cgroups(hierarchy / f"pyexec-bench-{tag}")


def _mounts_under(path: Path) -> list[str]:
    """Mount points below ``path``, deepest first."""
    prefix = str(path).rstrip("/") + "/"
    with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as f:
        points = [line.split()[4] for line in f]
    return sorted((p for p in points if p.startswith(prefix)), key=len, reverse=True)


def _remove_empty_cgroups(top: Path) -> None:
    if not top.is_dir():
        return
    for path in sorted(top.rglob("*"), key=lambda p: len(p.parts), reverse=True):
        if path.is_dir():
            with contextlib.suppress(OSError):
                path.rmdir()
    with contextlib.suppress(OSError):
        top.rmdir()


def _report_server_errors(log_path: Path) -> None:
    text = _tail(log_path)
    if "Traceback" in text or "error" in text.lower():
        print(f"--- the server's log (last lines) ---\n{text}", file=sys.stderr)


def _tail(path: Path) -> str:
    try:
        return path.read_text(errors="replace")[-3000:]
    except OSError:
        return ""
