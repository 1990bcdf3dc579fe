"""Clusters of their own: starved (no workers), a worker SIGKILLed mid-run, a crash simulated
at the point where a worker had taken an execution but not started it, bad settings."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import httpx2
import pytest
from cluster import Cluster, post_exec, tar_of, wait_status
from server_process import SERVER_BIN

pytestmark = [pytest.mark.redis, pytest.mark.sandbox, pytest.mark.timeout(300)]


def submit(client: httpx2.Client, code: str) -> str:
    response = post_exec(client, tar_of({"main.py": code}), {}, mode="async")
    assert response.status_code == 202, response.text
    execution_id: str = response.json()["execution_id"]
    return execution_id


def redis_call(cluster: Cluster, *args: str) -> object:
    import redis

    client = redis.Redis.from_url(cluster.redis_url, decode_responses=True)
    try:
        return client.execute_command(*args)
    finally:
        client.close()


def test_queue_full_503_then_workers_drain_it(cluster: Cluster) -> None:
    api = cluster.start_api(PYEXEC_MAX_QUEUE="2")
    with httpx2.Client(base_url=api.url, timeout=60) as c:
        first, second = submit(c, "print('one')"), submit(c, "print('two')")
        time.sleep(0.5)
        # Nobody runs anything on an API-only node: both wait.
        assert c.get(f"/api/v1/executions/{first}").json()["status"] == "pending"
        assert c.get("/health").json()["queue_depth"] == 2
        response = post_exec(c, tar_of({"main.py": "print(3)"}), {}, mode="async")
        assert response.status_code == 503
        assert response.headers["retry-after"] == "1"
        assert "queue is full" in response.json()["error"]
        assert not list((api.data_dir / "uploads").iterdir())
        cluster.start_worker("worker-a")
        assert wait_status(c, first, {"completed"})["stdout"] == "one\n"
        assert wait_status(c, second, {"completed"})["stdout"] == "two\n"
    assert cluster.ran_on(first) == ["worker-a"]


def test_kill_pending_and_oversized_project(cluster: Cluster) -> None:
    api = cluster.start_api(PYEXEC_REDIS_MAX_PROJECT_BYTES="65536")
    with httpx2.Client(base_url=api.url, timeout=60) as c:
        pending = submit(c, "print('never')")
        key = f"{cluster.namespace}:project:{pending}"
        assert redis_call(cluster, "EXISTS", key) == 1
        assert c.delete(f"/api/v1/executions/{pending}").json() == {"status": "killed"}
        assert redis_call(cluster, "EXISTS", key) == 0
        big = tar_of({"main.py": "print(1)", "blob.txt": "x" * 100_000})
        response = post_exec(c, big, {}, mode="async")
        assert response.status_code == 413
        assert "PYEXEC_REDIS_MAX_PROJECT_BYTES" in response.json()["error"]
        listed = c.get("/api/v1/executions").json()["executions"]
        assert [e["execution_id"] for e in listed] == [pending]
        assert not list((api.data_dir / "uploads").iterdir())


def test_sigkilled_worker_does_not_leave_its_run_running(cluster: Cluster) -> None:
    api = cluster.start_api(PYEXEC_REDIS_LEASE_SECONDS="2")
    cluster.start_worker("worker-a", PYEXEC_REDIS_LEASE_SECONDS="2")
    with httpx2.Client(base_url=api.url, timeout=60) as c:
        doomed = submit(c, "import time\nprint('up', flush=True)\ntime.sleep(60)")
        wait_status(c, doomed, {"running"})
        killed_at = time.monotonic()
        cluster.kill_worker("worker-a")
        body = wait_status(c, doomed, {"failed"}, timeout=30)
        settled = time.monotonic() - killed_at
        assert body["error"].startswith("worker lost")
        assert settled < 10, f"took {settled:.1f} s"
        print(f"\nrun of a SIGKILLed worker failed after {settled:.1f} s (lease 2 s)")
        # The cluster goes on: another worker takes new work.
        cluster.start_worker("worker-b", PYEXEC_REDIS_LEASE_SECONDS="2")
        after = submit(c, "print('after')")
        assert wait_status(c, after, {"completed"})["stdout"] == "after\n"
    assert cluster.ran_on(after) == ["worker-b"]


def test_taken_but_never_started_by_a_dead_worker_runs_again(cluster: Cluster) -> None:
    # Settled by the restarted worker-a (its previous life's list) or by the API node's
    # reaper (worker-a's lease is gone), whichever looks first: either way it runs.
    api = cluster.start_api()
    with httpx2.Client(base_url=api.url, timeout=60) as c:
        taken = submit(c, "print('ran after all')")
        # The state a worker "worker-a" leaves when it dies right after taking an
        # execution from the queue, before starting it: in its taken list, still pending.
        ns = cluster.namespace
        moved = redis_call(
            cluster, "LMOVE", f"{ns}:queue:pending", f"{ns}:queue:taken:worker-a", "RIGHT", "LEFT"
        )
        assert moved == taken
        redis_call(cluster, "SADD", f"{ns}:nodes", "worker-a")
        cluster.start_worker("worker-a")
        assert wait_status(c, taken, {"completed"})["stdout"] == "ran after all\n"
    assert cluster.ran_on(taken) == ["worker-a"]
    assert redis_call(cluster, "LLEN", f"{cluster.namespace}:queue:taken:worker-a") == 0


def _run_server(command: str, env: dict[str, str], tmp: str) -> subprocess.CompletedProcess[str]:
    full = {**os.environ, "PYEXEC_DATA_DIR": tmp, "PYEXEC_PORT": "1", **env}
    return subprocess.run(
        [str(SERVER_BIN), command], env=full, capture_output=True, text=True, timeout=60
    )


@pytest.mark.parametrize(
    ("command", "env", "message"),
    [
        ("serve", {"PYEXEC_QUEUE": "redis", "PYEXEC_STORE": "sqlite"}, "needs PYEXEC_STORE=redis"),
        ("worker", {"PYEXEC_STORE": "redis"}, "set PYEXEC_QUEUE=redis"),
        ("serve", {"PYEXEC_RUN_WORKERS": "false"}, "API-only node"),
    ],
)
def test_refuses_combinations_that_cannot_work(
    command: str, env: dict[str, str], message: str, tmp_path: Path
) -> None:
    result = _run_server(command, env, str(tmp_path))
    assert result.returncode == 2, result.stderr
    assert message in result.stderr
    assert "Traceback" not in result.stderr


def test_a_second_live_process_cannot_take_a_node_id(cluster: Cluster) -> None:
    cluster.start_worker("worker-a", PYEXEC_REDIS_LEASE_SECONDS="1")
    env = {
        **os.environ,
        **cluster.env("worker-a", {"PYEXEC_REDIS_LEASE_SECONDS": "1"}),
        "PYEXEC_DATA_DIR": str(cluster.root / "dup"),
    }
    result = subprocess.run(
        [str(SERVER_BIN), "worker"], env=env, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 2
    assert "in use by another live process" in result.stderr


def test_sigterm_stops_a_worker_cleanly(cluster: Cluster) -> None:
    api = cluster.start_api()
    worker = cluster.start_worker("worker-a")
    with httpx2.Client(base_url=api.url, timeout=60) as c:
        running = submit(c, "import time\nprint('up', flush=True)\ntime.sleep(60)")
        wait_status(c, running, {"running"})
        time.sleep(1)  # it has printed by now
        stopping = time.monotonic()
        worker.stop()  # SIGTERM
        assert time.monotonic() - stopping < 10
        body = c.get(f"/api/v1/executions/{running}").json()
        assert body["status"] == "failed"
        assert body["error"] == "server shutting down"
        assert body["stdout"] == "up\n"
    assert redis_call(cluster, "SMEMBERS", f"{cluster.namespace}:nodes") == {"api"}
    assert redis_call(cluster, "EXISTS", f"{cluster.namespace}:node:worker-a") == 0
