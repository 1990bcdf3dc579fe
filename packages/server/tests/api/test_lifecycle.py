"""Async submit, polling, kill, list, live logs, timeouts, queue-full, restarts."""

from __future__ import annotations

import json
import os
import shutil
import signal
import threading
import time
from pathlib import Path
from typing import Any

import httpx2
import pytest
from api_helpers import eval_, post_exec, tar_of
from redis_server import RedisServer
from server_process import ServerProcess

pytestmark = [pytest.mark.sandbox, pytest.mark.timeout(180)]


def submit(client: httpx2.Client, code: str, **metadata: Any) -> str:
    response = post_exec(client, tar_of({"main.py": code}), metadata, mode="async")
    assert response.status_code == 202, response.text
    execution_id: str = response.json()["execution_id"]
    return execution_id


def wait_status(
    client: httpx2.Client, execution_id: str, statuses: set[str], timeout: float = 60
) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        body: dict[str, Any] = client.get(f"/api/v1/executions/{execution_id}").json()
        if body["status"] in statuses:
            return body
        time.sleep(0.05)
    raise AssertionError(f"{execution_id} never reached {statuses}")


def test_async_then_get(client: httpx2.Client) -> None:
    execution_id = submit(client, "print('async hello')")
    body = wait_status(client, execution_id, {"completed"})
    assert body["stdout"] == "async hello\n"


def test_unknown_id_404(client: httpx2.Client) -> None:
    for method in ("GET", "DELETE"):
        response = client.request(
            method, "/api/v1/executions/exe_00000000-0000-4000-8000-000000000000"
        )
        assert response.status_code == 404
        assert "not found" in response.json()["error"]


def test_kill_running(client: httpx2.Client) -> None:
    execution_id = submit(
        client, "import time\nprint('started', flush=True)\ntime.sleep(60)\nprint('never')"
    )
    wait_status(client, execution_id, {"running"})
    time.sleep(0.5)
    started = time.monotonic()
    response = client.delete(f"/api/v1/executions/{execution_id}")
    assert response.status_code == 200
    assert response.json() == {"status": "killed"}
    assert time.monotonic() - started < 3
    body = client.get(f"/api/v1/executions/{execution_id}").json()
    assert body["status"] == "killed"
    assert "never" not in body["stdout"]


def test_delete_finished_returns_its_status(client: httpx2.Client) -> None:
    body = eval_(client, "print(1)")
    response = client.delete(f"/api/v1/executions/{body['execution_id']}")
    assert response.json() == {"status": "completed"}


def test_timeout_keeps_partial_output(client: httpx2.Client) -> None:
    code = "import time\nprint('before', flush=True)\ntime.sleep(30)\nprint('after')"
    body = eval_(client, code, config={"timeout_seconds": 1})
    assert body["status"] == "failed"
    assert body["error"] == "timed out after 1 s"
    assert body["stdout"] == "before\n"
    assert body["duration_ms"] < 10_000


def test_list_with_filter_and_pagination(client: httpx2.Client) -> None:
    ids = [eval_(client, f"print({n})")["execution_id"] for n in range(3)]
    failing = eval_(client, "import time; time.sleep(5)", config={"timeout_seconds": 1})[
        "execution_id"
    ]
    page = client.get("/api/v1/executions", params={"limit": 2}).json()
    assert len(page["executions"]) == 2
    assert page["executions"][0]["execution_id"] == failing
    assert page["next_cursor"]
    rest = client.get(
        "/api/v1/executions", params={"limit": 2, "cursor": page["next_cursor"]}
    ).json()
    assert rest["executions"][0]["execution_id"] == ids[1]
    failed = client.get("/api/v1/executions", params={"status": "failed", "limit": 500}).json()
    assert failing in {e["execution_id"] for e in failed["executions"]}
    assert not set(ids) & {e["execution_id"] for e in failed["executions"]}
    assert client.get("/api/v1/executions", params={"status": "bogus"}).status_code == 400


def read_sse(response: httpx2.Response) -> list[tuple[str, Any]]:
    events: list[tuple[str, Any]] = []
    event = None
    for line in response.iter_lines():
        if line.startswith("event: "):
            event = line[7:]
        elif line.startswith("data: ") and event:
            events.append((event, json.loads(line[6:])))
            if event == "exit":
                break
    return events


def test_live_logs_of_running_execution(client: httpx2.Client) -> None:
    code = (
        "import time\nfor i in range(3):\n    print('tick', i, flush=True)\n    time.sleep(0.3)\n"
    )
    execution_id = submit(client, code)
    with client.stream("GET", f"/api/v1/executions/{execution_id}/logs") as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        events = read_sse(response)
    text = "".join(data["data"] for kind, data in events if kind == "stdout")
    assert text == "tick 0\ntick 1\ntick 2\n"
    assert events[-1][0] == "exit"
    assert events[-1][1]["status"] == "completed"


def test_logs_of_finished_execution(client: httpx2.Client) -> None:
    body = eval_(client, "import sys\nprint('o')\nprint('e', file=sys.stderr)")
    with client.stream("GET", f"/api/v1/executions/{body['execution_id']}/logs") as response:
        events = read_sse(response)
    assert ("stdout", {"data": "o\n"}) in events
    assert ("stderr", {"data": "e\n"}) in events
    assert events[-1][1]["exit_code"] == 0


def test_queue_full_503(make_server: type[ServerProcess]) -> None:
    server = make_server({"PYEXEC_MAX_CONCURRENT": "1", "PYEXEC_MAX_QUEUE": "1"}).start()
    with httpx2.Client(base_url=server.url, timeout=60) as c:
        first = submit(c, "import time; time.sleep(30)")
        # A free slot: recorded as running from the start, never seen pending
        assert c.get(f"/api/v1/executions/{first}").json()["status"] == "running"
        second = submit(c, "print('queued')")
        assert c.get(f"/api/v1/executions/{second}").json()["status"] == "pending"
        response = post_exec(c, tar_of({"main.py": "print(3)"}), {}, mode="async")
        assert response.status_code == 503
        assert response.headers["retry-after"] == "1"
        assert "queue is full" in response.json()["error"]
        assert not list((server.data_dir / "uploads").iterdir()) or all(
            p.name in (first, second) for p in (server.data_dir / "uploads").iterdir()
        )
        c.delete(f"/api/v1/executions/{first}")
        assert wait_status(c, second, {"completed"})["stdout"] == "queued\n"


def test_restart_durability(make_server: type[ServerProcess]) -> None:
    server = make_server().start()
    with httpx2.Client(base_url=server.url, timeout=60) as c:
        done = eval_(c, "print('kept')")["execution_id"]
        stuck = submit(c, "import time; time.sleep(60)")
        wait_status(c, stuck, {"running"})
    server.stop(signal.SIGKILL)
    server.start()
    with httpx2.Client(base_url=server.url, timeout=60) as c:
        assert c.get(f"/api/v1/executions/{done}").json()["stdout"] == "kept\n"
        body = c.get(f"/api/v1/executions/{stuck}").json()
        assert body["status"] == "failed"
        assert body["error"] == "server restarted"


def test_an_eval_answers_with_the_record_the_store_keeps(client: httpx2.Client) -> None:
    body = eval_(client, "import sys\nprint('out')\nprint('err', file=sys.stderr)\n1 / 0")
    assert body["error_type"] == "ZeroDivisionError"
    assert client.get(f"/api/v1/executions/{body['execution_id']}").json() == body


def test_a_sync_answer_is_stored_before_the_next_request_is_read(client: httpx2.Client) -> None:
    # The answer goes out before the store's write (service._finish): a read the moment
    # it arrives, here or on another connection, must still find the record finished.
    _answers_are_stored(client)


@pytest.mark.redis
def test_with_a_networked_store_the_answer_waits_for_its_write(
    make_server: type[ServerProcess], tmp_path: Path
) -> None:
    # A Redis store's write can let a read in before it is done, so there the answer
    # waits for it. Made visible: Redis holds writes (CLIENT PAUSE ... WRITE, reads go
    # on) from the middle of each run until well after its end; an answer sent before
    # the write would be read back as still running.
    import redis

    binary = shutil.which("redis-server")
    if binary is None:
        pytest.skip("redis-server is not installed (apt-get install redis-server)")
    server_of_redis = RedisServer.start(tmp_path, binary)
    try:
        env = {"PYEXEC_STORE": "redis", "PYEXEC_REDIS_URL": server_of_redis.url}
        server = make_server({**env, "PYEXEC_QUEUE": "local"}).start()
        with httpx2.Client(base_url=server.url, timeout=60) as c:
            with redis.Redis.from_url(server_of_redis.url) as r:
                for i in range(3):
                    pause = threading.Timer(0.15, r.client_pause, (400, False))
                    pause.start()
                    body = eval_(c, f"import time\ntime.sleep(0.3)\nprint({i})")
                    pause.join()
                    assert body["stdout"] == f"{i}\n", body
                    assert c.get(f"/api/v1/executions/{body['execution_id']}").json() == body
            _answers_are_stored(c)
        server.stop()
    finally:
        server_of_redis.stop()


def _answers_are_stored(client: httpx2.Client) -> None:
    with httpx2.Client(base_url=client.base_url, timeout=60) as other:
        for i in range(20):
            body = eval_(client, f"print({i})")
            assert body["stdout"] == f"{i}\n"
            reader = other if i % 2 else client
            assert reader.get(f"/api/v1/executions/{body['execution_id']}").json() == body
        tar = tar_of({"main.py": "print('sync')"})
        for _ in range(5):
            body = post_exec(client, tar, {}).json()
            assert body["status"] == "completed"
            assert other.get(f"/api/v1/executions/{body['execution_id']}").json() == body


def _runs_dir(server: ServerProcess) -> Path:
    """Where ``server`` keeps its workspaces (``ServerProcess`` picks it by uid)."""
    if os.geteuid() == 0:
        return Path(f"/run/pyexec-test-{server.tag}")
    return server.data_dir / "runs"


def _workspaces(runs: Path) -> list[str]:
    return sorted(p.name for p in runs.glob("exe_*")) if runs.is_dir() else []


def test_workspaces_go_after_the_answer_and_before_shutdown_ends(
    make_server: type[ServerProcess],
) -> None:
    # Without a pool every run gets a workspace of its own, named after the execution
    # (a pooled one's is the sandbox's: tests/sandbox/test_bwrap_zygote.py).
    server = make_server({"PYEXEC_POOL_ENABLED": "false"}).start()
    runs = _runs_dir(server)
    with httpx2.Client(base_url=server.url, timeout=60) as c:
        for _ in range(3):
            assert eval_(c, "open('left.txt', 'w').write('x')")["status"] == "completed"
        deadline = time.monotonic() + 10
        while _workspaces(runs) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _workspaces(runs) == []
        running = submit(c, "import time\ntime.sleep(60)")
        wait_status(c, running, {"running"})
        deadline = time.monotonic() + 10  # "running" comes just before its workspace
        while _workspaces(runs) != [running] and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _workspaces(runs) == [running]
    server.stop()  # SIGTERM: the run is stopped, and its workspace removed before the exit
    assert _workspaces(runs) == []
    server.start()
    with httpx2.Client(base_url=server.url, timeout=60) as c:
        body = c.get(f"/api/v1/executions/{running}").json()
    assert (body["status"], body["error"]) == ("failed", "server shutting down")
