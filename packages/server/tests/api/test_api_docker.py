"""The HTTP API on the Docker backend: a real server (``PYEXEC_SANDBOX=docker``), a real dockerd.

The server gets its own ``PYEXEC_DOCKER_INSTANCE`` (it reaps only its own
containers; others share the daemon), the locally built sandbox image as the
default, the default warm pool, and an image map where 3.11 is the sandbox
image and 3.10 an image that is not on the host (the server never pulls), so
``python_version`` → image is observable. Skips only when no daemon answers and
``CI`` is not ``true``.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import socket
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx2
import pytest
from api_helpers import eval_, post_exec, run, tar_of
from proc_scan import pids_with_env
from python_executor_server.settings import Settings
from server_process import ServerProcess

pytestmark = [pytest.mark.docker, pytest.mark.timeout(180)]

IMAGE = "python-executor-sandbox:latest"
MISSING_IMAGE = "python-executor-no-such-image:latest"
INSTANCE = f"api-test-{uuid.uuid4().hex[:8]}"
IMAGES = {"3.11": IMAGE, "3.10": MISSING_IMAGE}
SOCKET = Settings().docker_socket  # PYEXEC_DOCKER_SOCKET, as the server reads it
MARKER_VAR = "PYEXEC_API_MARKER"
SLEEPER = "import time\nprint('started', flush=True)\ntime.sleep(120)\nprint('never')\n"


def _unavailable(reason: str) -> None:
    if os.environ.get("CI") == "true":
        pytest.fail(f"Docker tests must run in CI: {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def docker_api() -> Iterator[Any]:
    try:
        import docker  # type: ignore[import-untyped]
    except ImportError:
        _unavailable("docker-py is not installed (pip install 'python-executor-server[docker]')")
    if SOCKET.startswith("unix://"):  # docker-py leaks the socket of a failed connect
        with socket.socket(socket.AF_UNIX) as sock:
            try:
                sock.connect(SOCKET.removeprefix("unix://"))
            except OSError as exc:
                _unavailable(f"no Docker daemon answers at {SOCKET}: {exc}")
    client = docker.DockerClient(base_url=SOCKET, timeout=60)
    try:
        client.ping()
        client.api.inspect_image(IMAGE)
    except Exception as exc:
        client.close()
        if type(exc).__name__ == "ImageNotFound":
            pytest.fail(f"a Docker daemon answers but {IMAGE} is missing: make docker-image")
        _unavailable(f"no Docker daemon answers at {SOCKET} (scripts/start-dockerd.sh): {exc}")
    yield client.api
    client.close()


@pytest.fixture(scope="module")
def docker_server(
    docker_api: Any, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    env = {
        "PYEXEC_SANDBOX": "docker",
        "PYEXEC_DOCKER_INSTANCE": INSTANCE,
        "PYEXEC_DEFAULT_IMAGE": IMAGE,
        "PYEXEC_DOCKER_IMAGES": json.dumps(IMAGES),
    }
    server = ServerProcess(tmp_path_factory.mktemp("docker-server") / "data", env).start()
    yield server
    server.stop()
    left = docker_api.containers(
        all=True, filters={"label": f"python-executor.instance={INSTANCE}"}
    )
    assert left == [], f"the server left containers behind: {server.log_text()}"


@pytest.fixture()
def client(docker_server: ServerProcess) -> Iterator[httpx2.Client]:
    with httpx2.Client(base_url=docker_server.url, timeout=120) as c:
        yield c


def marker_pids(marker: str) -> list[int]:
    """Host pids whose environment carries ``MARKER=<marker>`` (container processes are
    host processes; zombies have no environment: not counted)."""
    return pids_with_env(MARKER_VAR, marker)


def container_of(pid: int) -> str:
    """The Docker container id of a host process, from its cgroup path."""
    found = re.search(r"[0-9a-f]{64}", Path(f"/proc/{pid}/cgroup").read_text())
    assert found, f"process {pid} is not in a Docker container"
    return found.group(0)


def container_gone(api: Any, container_id: str, within: float = 10) -> bool:
    """Auto-removal is asynchronous: wait up to ``within`` s."""
    deadline = time.monotonic() + within
    while api.containers(all=True, filters={"id": container_id}):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def wait_for_output(client: httpx2.Client, execution_id: str, text: str) -> None:
    """Follow the live log until ``text`` was printed: the program is really running."""
    seen = ""
    with client.stream("GET", f"/api/v1/executions/{execution_id}/logs") as response:
        for line in response.iter_lines():
            if line.startswith("data: ") and '"data"' in line:
                seen += json.loads(line.removeprefix("data: "))["data"]
                if text in seen:
                    return
    raise AssertionError(f"{execution_id} ended without printing {text!r}: {seen!r}")


# --- running code ------------------------------------------------------------------------


def test_health_names_the_docker_backend(client: httpx2.Client) -> None:
    body = client.get("/health").json()
    assert body["status"] == "ok" and body["backend"] == "docker"
    sandbox = body["sandbox"]
    assert sandbox["backend"] == "docker" and sandbox["default_image"] == IMAGE
    assert sandbox["default_image_present"] is True


def test_eval_hello_world(client: httpx2.Client) -> None:
    body = eval_(client, "import os\nprint('hello', os.getuid(), os.getcwd())")
    assert (body["status"], body["exit_code"]) == ("completed", 0), body
    assert (body["stdout"], body["stderr"]) == ("hello 1000 /work\n", "")
    assert body["usage"]["peak_memory_mb"] > 0


def test_eval_last_expr_result(client: httpx2.Client) -> None:
    body = eval_(client, "x = 6\nprint('out')\nx * 7", eval_last_expr=True)
    assert (body["result"], body["stdout"]) == ("42", "out\n"), body


@pytest.mark.parametrize(
    ("code", "error_type", "error_line"),
    [
        ("a = 1\nb = 2\nprint(undefined_name)\n", "NameError", 3),
        ("x = 1\ny = (\n", "SyntaxError", 2),
        ("import json\njson.loads('{')", "json.decoder.JSONDecodeError", 2),
    ],
)
def test_error_type_and_line(
    client: httpx2.Client, code: str, error_type: str, error_line: int
) -> None:
    body = eval_(client, code, eval_last_expr=True)
    assert (body["status"], body["exit_code"]) == ("completed", 1), body
    assert (body["error_type"], body["error_line"]) == (error_type, error_line)


def test_exec_sync_with_project_stdin_env_args_pre_commands(client: httpx2.Client) -> None:
    files = {
        "main.py": (
            "import os, sys\n"
            "from pkg.util import twice\n"
            "print(twice(21), sys.stdin.read().strip())\n"
            "print(os.environ['A'], os.environ['B'])\n"
            "print(sys.argv[1:])\n"
            "print(open('made-by-pre.txt').read().strip(), open('data/in.txt').read().strip())\n"
        ),
        "pkg/__init__.py": "",
        "pkg/util.py": "def twice(x):\n    return 2 * x\n",
        "data/in.txt": "from the tar\n",
    }
    body = run(
        client,
        files,
        stdin="line from stdin\n",
        env_vars=["A=1", "B=two words"],
        script_args=["--flag", "with space"],
        pre_commands=["echo pre-one", "echo made > made-by-pre.txt"],
    )
    assert body["status"] == "completed" and body["exit_code"] == 0, body
    assert body["stdout"] == (
        "pre-one\n42 line from stdin\n1 two words\n['--flag', 'with space']\nmade from the tar\n"
    )


def test_failing_pre_command_stops_the_run(client: httpx2.Client) -> None:
    body = run(client, {"main.py": "print('never')"}, pre_commands=["echo before", "exit 7"])
    assert (body["status"], body["exit_code"], body["stdout"]) == ("completed", 7, "before\n")


# --- stopping code -----------------------------------------------------------------------


def test_timeout_keeps_partial_output(client: httpx2.Client) -> None:
    marker = uuid.uuid4().hex
    env = [f"{MARKER_VAR}={marker}"]
    body = eval_(client, SLEEPER, config={"timeout_seconds": 2}, env_vars=env)
    assert body["status"] == "failed" and body["error"] == "timed out after 2 s", body
    assert body["stdout"] == "started\n"
    assert body["duration_ms"] < 10_000
    assert marker_pids(marker) == []  # nothing of the run is left on the host


def test_delete_kills_the_container(client: httpx2.Client, docker_api: Any) -> None:
    marker = uuid.uuid4().hex
    metadata = {"env_vars": [f"{MARKER_VAR}={marker}"]}
    response = post_exec(client, tar_of({"main.py": SLEEPER}), metadata, mode="async")
    assert response.status_code == 202, response.text
    execution_id = response.json()["execution_id"]
    wait_for_output(client, execution_id, "started")
    pids = marker_pids(marker)
    assert len(pids) == 1, pids
    container = container_of(pids[0])
    started = time.monotonic()
    response = client.delete(f"/api/v1/executions/{execution_id}")
    assert response.json() == {"status": "killed"}
    assert time.monotonic() - started < 3
    assert marker_pids(marker) == []
    assert container_gone(docker_api, container, within=2)
    body = client.get(f"/api/v1/executions/{execution_id}").json()
    assert body["status"] == "killed" and "never" not in body["stdout"]


def test_memory_limit_is_a_failure_naming_it(client: httpx2.Client) -> None:
    code = "print('allocating', flush=True)\nhog = []\nwhile True:\n    hog += [bytearray(8 << 20)]"
    body = eval_(client, code, config={"memory_mb": 64})
    assert body["status"] == "failed" and "memory limit" in body["error"], body
    assert body["stdout"] == "allocating\n"


# --- images --------------------------------------------------------------------------------


def test_python_version_maps_to_the_configured_image(client: httpx2.Client) -> None:
    code = "import sys\nprint('%d.%d' % sys.version_info[:2])"
    in_image = eval_(client, code, python_version="3.11")
    assert (in_image["status"], in_image["stdout"]) == ("completed", "3.11\n"), in_image
    # 3.10 maps to an image that is not on the host: the run fails naming that image.
    missing = eval_(client, code, python_version="3.10")
    assert missing["status"] == "failed", missing
    assert MISSING_IMAGE in missing["error"] and "never pulls" in missing["error"]


def test_unknown_python_version_is_400_listing_the_configured(client: httpx2.Client) -> None:
    response = client.post("/api/v1/eval", json={"code": "1", "python_version": "3.9"})
    assert response.status_code == 400
    assert "3.10" in response.json()["error"] and "3.11" in response.json()["error"]


def test_docker_image_from_the_allow_list(client: httpx2.Client) -> None:
    body = eval_(client, "print('allowed')", docker_image=IMAGE)
    assert (body["status"], body["stdout"]) == ("completed", "allowed\n"), body


@pytest.mark.parametrize("mode", ["eval", "exec"])
def test_docker_image_not_allowed_is_400_listing_the_allowed(
    client: httpx2.Client, mode: str
) -> None:
    image = "python:3.12-slim"  # a real image name, but not configured on this server
    if mode == "eval":
        response = client.post("/api/v1/eval", json={"code": "1", "docker_image": image})
    else:
        response = post_exec(client, tar_of({"main.py": "1"}), {"docker_image": image})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert image in error and "not allowed" in error
    for allowed in (IMAGE, MISSING_IMAGE):
        assert allowed in error


# --- requirements --------------------------------------------------------------------------
# Environments are built by the server and bind-mounted read-only into the run's
# container (docs/docker.md). With the default PYEXEC_INSTALL_ISOLATION=sandbox the
# installer itself runs through the Docker backend, which needs its target and the
# uv cache mounted writable; the backend binds every mount read-only.
SIX = "import six, sys\nprint(six.__name__, six.__file__.startswith('/work'))"


def test_requirements_installed_in_the_sandbox(client: httpx2.Client) -> None:
    body = eval_(client, SIX, requirements_txt="six", python_version="3.11")
    assert body["status"] == "completed", body["error"]
    assert body["stdout"] == "six False\n"


def test_requirements_installed_on_the_host_are_mounted(
    make_server: type[ServerProcess], docker_api: Any
) -> None:
    instance = f"api-test-{uuid.uuid4().hex[:8]}"
    server = make_server(
        {
            "PYEXEC_SANDBOX": "docker",
            "PYEXEC_DOCKER_INSTANCE": instance,
            "PYEXEC_DEFAULT_IMAGE": IMAGE,
            "PYEXEC_DOCKER_IMAGES": json.dumps(IMAGES),
            "PYEXEC_DOCKER_POOL_SIZE": "0",
            "PYEXEC_INSTALL_ISOLATION": "host",
        }
    ).start()
    ipam = docker_api.inspect_network("bridge")["IPAM"]["Config"][0]
    gateway = ipam.get("Gateway") or str(ipaddress.ip_network(ipam["Subnet"])[1])
    with socket.socket() as listener, httpx2.Client(base_url=server.url, timeout=300) as c:
        listener.bind((gateway, 0))  # this host's own bridge address, never an outside one
        listener.listen(1)
        listener.setblocking(False)
        address = (gateway, listener.getsockname()[1])
        probe = f"{SIX}\nimport socket\nsocket.create_connection({address!r}, 3)"
        body = eval_(c, probe, requirements_txt="six", python_version="3.11")
        assert body["status"] == "completed", body["error"]
        assert body["stdout"] == "six False\n"  # installed, mounted, importable
        assert body["error_type"] in ("OSError", "PermissionError"), body  # and offline
        with pytest.raises(BlockingIOError):
            listener.accept()
    server.stop()
    left = docker_api.containers(
        all=True, filters={"label": f"python-executor.instance={instance}"}
    )
    assert left == [], server.log_text()
