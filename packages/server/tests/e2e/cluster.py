"""A python-executor cluster of real processes sharing one real redis-server, for e2e tests.

``Cluster`` starts API nodes (``serve``, via ``ServerProcess``) and workers
(``WorkerProcess``: ``python-executor-server worker``), all with the Redis
queue and store in one fresh namespace. Workers log JSON lines at info level,
so a test can tell which node ran an execution (``ran_on``).
"""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import tarfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx2
from server_process import SERVER_BIN, ServerProcess


@dataclass
class WorkerProcess(ServerProcess):
    """``python-executor-server worker``: ready once it logs "worker ready"."""

    def start(self, timeout: float = 60) -> WorkerProcess:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        env = {
            **os.environ,
            "PYEXEC_DATA_DIR": str(self.data_dir),
            "PYEXEC_RUN_DIR": f"/run/pyexec-test-{self.tag}"
            if os.geteuid() == 0
            else str(self.data_dir / "runs"),
            "PYEXEC_CGROUP_ROOT": f"pyexec-test-{self.tag}",
            "PYEXEC_LOG_LEVEL": "info",
            "PYEXEC_LOG_JSON": "true",
            **self.env,
        }
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [str(SERVER_BIN), "worker"], env=env, stdout=log, stderr=log
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"worker exited with {self.proc.returncode}: {self.log_text()}")
            if any(line.get("event") == "worker ready" for line in self.log_lines()):
                return self
            time.sleep(0.1)
        raise RuntimeError(f"worker did not become ready: {self.log_text()}")

    @property
    def log_path(self) -> Path:
        return self.data_dir.parent / f"server-{self.tag}.log"

    def log_lines(self) -> list[dict[str, Any]]:
        lines: list[dict[str, Any]] = []
        if self.log_path.exists():
            for raw in self.log_path.read_text(errors="replace").splitlines():
                if raw.startswith("{"):
                    lines.append(json.loads(raw))
        return lines

    def taken(self) -> set[str]:
        """Ids of the executions this worker took from the queue."""
        return {
            line["execution_id"]
            for line in self.log_lines()
            if line.get("event") == "execution taken"
        }


@dataclass
class Cluster:
    redis_url: str
    root: Path
    namespace: str = field(default_factory=lambda: f"e2e-{uuid.uuid4().hex[:8]}")
    apis: list[ServerProcess] = field(default_factory=list)
    workers: dict[str, WorkerProcess] = field(default_factory=dict)

    def env(self, node_id: str, extra: dict[str, str]) -> dict[str, str]:
        return {
            "PYEXEC_QUEUE": "redis",
            "PYEXEC_STORE": "redis",
            "PYEXEC_REDIS_URL": self.redis_url,
            "PYEXEC_REDIS_NAMESPACE": self.namespace,
            "PYEXEC_NODE_ID": node_id,
            **extra,
        }

    def start_api(self, name: str = "api", **extra: str) -> ServerProcess:
        env = self.env(name, {"PYEXEC_RUN_WORKERS": "false", **extra})
        data_dir = self.root / name / "data"
        data_dir.mkdir(parents=True, exist_ok=True)
        api = ServerProcess(data_dir, env).start()
        self.apis.append(api)
        return api

    def start_worker(self, name: str, **extra: str) -> WorkerProcess:
        env = self.env(name, {"PYEXEC_MAX_CONCURRENT": "2", **extra})
        worker = WorkerProcess(self.root / name / "data", env).start()
        self.workers[name] = worker
        return worker

    def ran_on(self, execution_id: str) -> list[str]:
        return [name for name, w in self.workers.items() if execution_id in w.taken()]

    def kill_worker(self, name: str) -> None:
        self.workers[name].stop(signal.SIGKILL)

    def stop(self) -> None:
        for worker in self.workers.values():
            worker.stop()
        for api in self.apis:
            api.stop()


def wait_status(
    client: httpx2.Client, execution_id: str, statuses: set[str], timeout: float = 60
) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        body: dict[str, Any] = client.get(f"/api/v1/executions/{execution_id}").json()
        if body["status"] in statuses:
            return body
        time.sleep(0.05)
    raise AssertionError(f"{execution_id} never reached {statuses}: {body}")


def read_sse(response: httpx2.Response) -> list[tuple[float, str, Any]]:
    """(arrival time, event, data) until the ``exit`` event."""
    events: list[tuple[float, str, Any]] = []
    event = None
    for line in response.iter_lines():
        if line.startswith("event: "):
            event = line[7:]
        elif line.startswith("data: ") and event:
            events.append((time.monotonic(), event, json.loads(line[6:])))
            if event == "exit":
                break
    return events


def tar_of(files: dict[str, str]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, content in files.items():
            data = content.encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mode = 0o644
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def post_exec(
    client: httpx2.Client, tar: bytes, metadata: dict[str, Any], mode: str = "sync"
) -> httpx2.Response:
    files: dict[str, Any] = {
        "tar": ("project.tar", tar, "application/x-tar"),
        "metadata": (None, json.dumps(metadata), "application/json"),
    }
    return client.post(f"/api/v1/exec/{mode}", files=files)
