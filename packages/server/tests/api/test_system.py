"""Health, metrics, OpenAPI and the offline Swagger UI."""

from __future__ import annotations

import re
import time

import httpx2
import pytest
from server_process import ServerProcess

pytestmark = pytest.mark.timeout(60)


def test_health(client: httpx2.Client) -> None:
    body = client.get("/health").json()
    assert body["status"] == "ok"
    assert body["backend"] == "bwrap"
    assert body["python_versions"]
    assert "sandbox" in body


def test_metrics(client: httpx2.Client) -> None:
    client.post("/api/v1/eval", json={"code": "1"})
    text = client.get("/metrics").text
    assert "pyexec_executions_finished_total" in text


def test_openapi_documents_every_endpoint(client: httpx2.Client) -> None:
    doc = client.get("/openapi.json").json()
    assert doc["openapi"].startswith("3.")
    paths = doc["paths"]
    for path in (
        "/api/v1/exec/sync",
        "/api/v1/exec/async",
        "/api/v1/eval",
        "/api/v1/executions/{execution_id}",
        "/api/v1/executions",
        "/api/v1/executions/{execution_id}/logs",
        "/health",
        "/metrics",
    ):
        assert path in paths, path
    assert "multipart/form-data" in paths["/api/v1/exec/sync"]["post"]["requestBody"]["content"]
    assert "Server-Timing" in paths["/api/v1/eval"]["post"]["responses"]["200"]["headers"]
    assert client.get("/docs/doc.json").json() == doc


def test_swagger_ui_is_offline(client: httpx2.Client) -> None:
    html = client.get("/docs").text
    assert "swagger-ui" in html
    urls = re.findall(r'(?:src|href)="([^"]+)"', html) + re.findall(r"url: '([^']+)'", html)
    assert urls
    for url in urls:
        assert url.startswith("/"), f"external asset {url}"
        assert client.get(url).status_code == 200, url


def test_unknown_route_is_json(client: httpx2.Client) -> None:
    response = client.get("/nope")
    assert response.status_code == 404
    assert "error" in response.json()


def test_the_first_eval_after_start_gets_a_sandbox_started_ahead(
    make_server: type[ServerProcess],
) -> None:
    """The default eval's sandboxes start with the server, not with its first request."""
    server = make_server().start()
    with httpx2.Client(base_url=server.url, timeout=60) as c:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            keys = c.get("/health").json()["sandbox"]["pool"].get("keys", [])
            if keys and keys[0]["ready"] >= 1:
                break
            time.sleep(0.05)
        assert keys and keys[0]["ready"] >= 1, keys  # before any request asked for one
        body = c.post("/api/v1/eval", json={"code": "print('first')"}).json()
        assert (body["status"], body["stdout"]) == ("completed", "first\n")
        pool = c.get("/health").json()["sandbox"]["pool"]
    assert (pool["hits"], pool["misses"]) == (1, 0)
