"""A real `python-executor-server` process on a free loopback port, for tests."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import httpx2

SERVER_BIN = Path(sys.executable).with_name("python-executor-server")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class ServerProcess:
    data_dir: Path
    env: dict[str, str] = field(default_factory=dict)
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None
    tag: str = field(default_factory=lambda: uuid.uuid4().hex[:8])

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 60) -> ServerProcess:
        env = {
            **os.environ,
            "PYEXEC_HOST": "127.0.0.1",
            "PYEXEC_PORT": str(self.port),
            "PYEXEC_DATA_DIR": str(self.data_dir),
            "PYEXEC_RUN_DIR": f"/run/pyexec-test-{self.tag}"
            if os.geteuid() == 0
            else str(self.data_dir / "runs"),
            "PYEXEC_CGROUP_ROOT": f"pyexec-test-{self.tag}",
            "PYEXEC_LOG_LEVEL": "warning",
            **self.env,
        }
        with open(self.data_dir.parent / f"server-{self.tag}.log", "ab") as log:
            self.proc = subprocess.Popen(
                [str(SERVER_BIN), "serve"], env=env, stdout=log, stderr=log
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}: {self.log_text()}")
            try:
                if httpx2.get(self.url + "/health", timeout=1).status_code == 200:
                    return self
            except httpx2.TransportError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"server did not become healthy: {self.log_text()}")

    def log_text(self) -> str:
        path = self.data_dir.parent / f"server-{self.tag}.log"
        return path.read_text(errors="replace")[-4000:] if path.exists() else ""

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None
        self.remove_leftovers()

    def remove_leftovers(self) -> None:
        """What a server killed with SIGKILL leaves: its mounts and work dirs under its run
        dir, its cgroups. A later server of the same run dir and cgroup root reaps them at
        start (tested elsewhere); a test's are its own, so nothing else would."""
        if os.geteuid() != 0:
            return  # (its run dir is under the data dir; no cgroups)
        from python_executor_server.sandbox.cgroupfs import reap_stale, rmdir, v1_mounts, v2_mount
        from python_executor_server.sandbox.mounts import remove_tree

        remove_tree(Path(f"/run/pyexec-test-{self.tag}"))
        hierarchies = [*v1_mounts().values(), *filter(None, [v2_mount()])]
        for tree in dict.fromkeys(h / f"pyexec-test-{self.tag}" for h in hierarchies):
            if tree.is_dir():
                reap_stale(tree)
                with contextlib.suppress(OSError):
                    rmdir(tree)
