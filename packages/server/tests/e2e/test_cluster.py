"""An API-only node and two worker processes sharing a real redis-server, over real HTTP and bwrap.

The API node runs nothing itself (PYEXEC_RUN_WORKERS=false): every execution
below is run by a worker, which the workers' own logs show.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx2
import pytest
from cluster import Cluster, post_exec, read_sse, tar_of, wait_status

pytestmark = [pytest.mark.redis, pytest.mark.sandbox, pytest.mark.timeout(300)]


@pytest.fixture()
def api(shared_cluster: Cluster) -> httpx2.Client:
    with httpx2.Client(base_url=shared_cluster.apis[0].url, timeout=120) as client:
        yield client  # type: ignore[misc]


def submit(client: httpx2.Client, files: dict[str, str], **metadata: Any) -> str:
    response = post_exec(client, tar_of(files), metadata, mode="async")
    assert response.status_code == 202, response.text
    execution_id: str = response.json()["execution_id"]
    return execution_id


def test_api_node_reports_itself_api_only(api: httpx2.Client) -> None:
    health = api.get("/health").json()
    assert health["queue"] == "redis"
    assert health["runs_executions"] is False
    assert health["node_id"] == "api"


def test_eval_runs_on_a_worker(shared_cluster: Cluster, api: httpx2.Client) -> None:
    response = api.post("/api/v1/eval", json={"code": "x = 6 * 7\nx", "eval_last_expr": True})
    body = response.json()
    assert body["status"] == "completed", body
    assert body["result"] == "42"
    assert len(shared_cluster.ran_on(body["execution_id"])) == 1


def test_exec_sync_project_files_reach_the_worker(
    shared_cluster: Cluster, api: httpx2.Client
) -> None:
    files = {
        "main.py": "from lib.util import greet\nprint(greet(open('data/name.txt').read()))",
        "lib/__init__.py": "",
        "lib/util.py": "def greet(name):\n    return 'hello ' + name.strip()",
        "data/name.txt": "worker\n",
    }
    response = post_exec(api, tar_of(files), {"stdin": ""})
    body = response.json()
    assert body["status"] == "completed", body
    assert body["stdout"] == "hello worker\n"
    assert len(shared_cluster.ran_on(body["execution_id"])) == 1
    # The project travelled through Redis: nothing is left on the API node.
    assert not list((shared_cluster.apis[0].data_dir / "uploads").iterdir())


def test_exec_async_runs_on_a_worker(shared_cluster: Cluster, api: httpx2.Client) -> None:
    execution_id = submit(api, {"main.py": "import sys\nprint('async'); sys.exit(3)"})
    body = wait_status(api, execution_id, {"completed"})
    assert body["stdout"] == "async\n"
    assert body["exit_code"] == 3
    assert len(shared_cluster.ran_on(execution_id)) == 1


def test_many_concurrent_submissions_all_complete(
    shared_cluster: Cluster, api: httpx2.Client
) -> None:
    count = 40

    def one(n: int) -> dict[str, Any]:
        with httpx2.Client(base_url=shared_cluster.apis[0].url, timeout=240) as c:
            if n % 2:
                return c.post("/api/v1/eval", json={"code": f"print({n} * 2)"}).json()
            response = post_exec(c, tar_of({"main.py": f"print({n} * 2)"}), {})
            return response.json()  # type: ignore[no-any-return]

    started = time.monotonic()
    with ThreadPoolExecutor(max_workers=16) as pool:
        results = list(pool.map(one, range(count)))
    elapsed = time.monotonic() - started
    assert [r["status"] for r in results] == ["completed"] * count
    assert [r["stdout"] for r in results] == [f"{n * 2}\n" for n in range(count)]
    ran = [shared_cluster.ran_on(r["execution_id"]) for r in results]
    assert all(len(nodes) == 1 for nodes in ran)
    assert {nodes[0] for nodes in ran} == {"worker-a", "worker-b"}  # both took work
    print(f"\n{count} sync runs through 2 workers: {elapsed:.1f} s, {count / elapsed:.1f}/s")


def test_kill_from_the_api_node_stops_a_run_on_a_worker(
    shared_cluster: Cluster, api: httpx2.Client
) -> None:
    code = "import time\nprint('started', flush=True)\ntime.sleep(60)\nprint('never')"
    execution_id = submit(api, {"main.py": code})
    wait_status(api, execution_id, {"running"})
    time.sleep(0.5)
    started = time.monotonic()
    response = api.delete(f"/api/v1/executions/{execution_id}")
    took = time.monotonic() - started
    assert response.json() == {"status": "killed"}
    assert took < 1.0, f"the kill took {took:.2f} s"
    print(f"\nkill across nodes: {took * 1000:.0f} ms")
    body = api.get(f"/api/v1/executions/{execution_id}").json()
    assert body["status"] == "killed"
    assert body["stdout"] == "started\n"
    assert len(shared_cluster.ran_on(execution_id)) == 1


def test_live_logs_across_nodes_with_a_late_joiner(
    shared_cluster: Cluster, api: httpx2.Client
) -> None:
    code = (
        "import time\nfor i in range(6):\n    print('tick', i, flush=True)\n    time.sleep(0.3)\n"
    )
    execution_id = submit(api, {"main.py": code})
    streams: dict[str, list[tuple[float, str, Any]]] = {}

    def follow(name: str, delay: float) -> None:
        time.sleep(delay)
        with httpx2.Client(base_url=shared_cluster.apis[0].url, timeout=60) as c:
            url = f"/api/v1/executions/{execution_id}/logs"
            with c.stream("GET", url) as response:
                assert response.headers["content-type"].startswith("text/event-stream")
                streams[name] = read_sse(response)

    threads = [
        threading.Thread(target=follow, args=(name, delay))
        for name, delay in (("early", 0.0), ("late", 1.0))
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    expected = "".join(f"tick {i}\n" for i in range(6))
    for events in streams.values():
        assert "".join(d["data"] for _, kind, d in events if kind == "stdout") == expected
        assert events[-1][1] == "exit"
        assert events[-1][2]["status"] == "completed"
    early = streams["early"]
    first_output = next(t for t, kind, _ in early if kind == "stdout")
    assert early[-1][0] - first_output > 1.0  # chunks arrived while it ran, not all at the end
    assert len(shared_cluster.ran_on(execution_id)) == 1


def test_logs_of_a_finished_execution(api: httpx2.Client) -> None:
    body = api.post(
        "/api/v1/eval", json={"code": "import sys\nprint('o')\nprint('e', file=sys.stderr)"}
    ).json()
    with api.stream("GET", f"/api/v1/executions/{body['execution_id']}/logs") as response:
        events = [(kind, data) for _, kind, data in read_sse(response)]
    assert ("stdout", {"data": "o\n"}) in events
    assert ("stderr", {"data": "e\n"}) in events
    assert events[-1][1]["exit_code"] == 0
