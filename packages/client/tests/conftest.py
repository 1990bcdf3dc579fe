"""A real ``python-executor-server`` for the client tests, and a runner for the real CLI."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import httpx2
import pytest

BIN = Path(sys.executable).parent
SERVER_BIN = BIN / "python-executor-server"
CLI_BIN = BIN / "python-executor"
MAX_UPLOAD_BYTES = 16 * 1024 * 1024


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _server_env(port: int, data_dir: Path, tag: str) -> dict[str, str]:
    as_root = os.geteuid() == 0
    return {
        **os.environ,
        "PYEXEC_HOST": "127.0.0.1",
        "PYEXEC_PORT": str(port),
        "PYEXEC_DATA_DIR": str(data_dir),
        "PYEXEC_RUN_DIR": f"/run/pyexec-client-{tag}" if as_root else str(data_dir / "runs"),
        "PYEXEC_CGROUP_ROOT": f"pyexec-client-{tag}",
        "PYEXEC_LOG_LEVEL": "warning",
        "PYEXEC_MAX_UPLOAD_BYTES": str(MAX_UPLOAD_BYTES),
    }


def _wait_healthy(proc: subprocess.Popen[bytes], url: str, log: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = log.read_text(errors="replace")[-3000:]
            pytest.fail(f"the server exited with {proc.returncode}:\n{tail}", pytrace=False)
        try:
            if httpx2.get(url + "/health", timeout=1).status_code == 200:
                return
        except httpx2.TransportError:
            pass
        time.sleep(0.1)
    pytest.fail(f"the server did not become healthy in {timeout} s", pytrace=False)


@pytest.fixture(scope="session")
def server_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Base URL of a real server on a free port with its own data dir, for the session."""
    data_dir = tmp_path_factory.mktemp("client-server")
    port, tag = free_port(), uuid.uuid4().hex[:8]
    log = data_dir / "server.log"
    url = f"http://127.0.0.1:{port}"
    with open(log, "ab") as log_file:
        proc = subprocess.Popen(
            [str(SERVER_BIN), "serve"],
            env=_server_env(port, data_dir / "data", tag),
            stdout=log_file,
            stderr=log_file,
        )
    try:
        _wait_healthy(proc, url, log, timeout=60)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        # The server leaves its run dir's empty skeleton (a run dir is normally a fixed
        # one, used again); this one is the session's own. Empty dirs only: rmdir never
        # goes through a mount.
        run_dir = Path(f"/run/pyexec-client-{tag}")
        for directory in (run_dir / ".sandbox", run_dir):
            with contextlib.suppress(OSError):
                os.rmdir(directory)


@pytest.fixture()
def upload_limit() -> int:
    """The server's maximum upload size (PYEXEC_MAX_UPLOAD_BYTES)."""
    return MAX_UPLOAD_BYTES


@pytest.fixture()
def closed_url() -> str:
    """A loopback URL where nothing listens."""
    return f"http://127.0.0.1:{free_port()}"


@dataclass(frozen=True)
class Completed:
    returncode: int
    stdout: str
    stderr: str


def run_cli(
    *args: str,
    stdin: bytes | None = None,
    cwd: Path | None = None,
    env: Mapping[str, str] | None = None,
    timeout: float = 90,
) -> Completed:
    """Run the installed ``python-executor`` as a real process."""
    proc = subprocess.run(
        [str(CLI_BIN), *args],
        input=stdin if stdin is not None else b"",
        capture_output=True,
        cwd=cwd,
        env={**os.environ, **(env or {})},
        timeout=timeout,
        check=False,
    )
    return Completed(proc.returncode, proc.stdout.decode(), proc.stderr.decode())


@pytest.fixture()
def cli() -> Callable[..., Completed]:
    """``cli("--server", url, "run", "x.py")``: the real ``python-executor`` as a process."""
    return run_cli
