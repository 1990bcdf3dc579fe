"""Fixtures for the Docker backend's tests (a plugin module, not conftest.py).

Test modules load it with ``pytest_plugins = ["conftest_docker"]`` and import
helpers from ``docker_support``. ``docker_backend`` skips, with the reason,
when no daemon answers or the sandbox image is missing, unless ``CI=true``,
where that is a failure: CI must run these tests.
"""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest
from docker_support import IMAGE, docker_settings, unavailable, wait_gone
from python_executor_server.sandbox.docker import DockerBackend
from python_executor_server.settings import Settings

SOCKET = Settings().docker_socket  # PYEXEC_DOCKER_SOCKET, as the server reads it


def _answers(base_url: str) -> bool:
    if not base_url.startswith("unix://"):
        return True  # let docker-py try
    with socket.socket(socket.AF_UNIX) as sock:
        try:
            sock.connect(base_url.removeprefix("unix://"))
        except OSError:
            return False
    return True


@pytest.fixture(scope="session")
def docker_api() -> Iterator[Any]:
    try:
        import docker  # type: ignore[import-untyped]
    except ImportError:
        unavailable("docker-py is not installed (pip install 'python-executor-server[docker]')")
    if not _answers(SOCKET):  # docker-py leaks the socket of a failed connect: ask first
        unavailable(f"no Docker daemon answers at {SOCKET} (bash scripts/start-dockerd.sh)")
    client = docker.DockerClient(base_url=SOCKET, timeout=60)
    try:
        client.ping()
    except Exception as exc:
        client.close()
        unavailable(f"no Docker daemon answers at {SOCKET} (bash scripts/start-dockerd.sh): {exc}")
    try:
        client.api.inspect_image(IMAGE)
    except Exception:
        client.close()
        unavailable(f"image {IMAGE} is missing (make docker-image)")
    yield client.api
    client.close()


@pytest.fixture()
async def docker_backend(docker_api: Any, tmp_path: Path) -> AsyncIterator[DockerBackend]:
    """A started backend without a warm pool: every run is a cold container."""
    backend = DockerBackend(docker_settings(tmp_path))
    await backend.start()
    yield backend
    await backend.close()
    assert await anyio.to_thread.run_sync(wait_gone, docker_api) == [], "containers left behind"


@pytest.fixture()
async def warm_backend(docker_api: Any, tmp_path: Path) -> AsyncIterator[DockerBackend]:
    backend = DockerBackend(docker_settings(tmp_path, docker_pool_size=1))
    await backend.start()
    yield backend
    await backend.close()
    assert await anyio.to_thread.run_sync(wait_gone, docker_api) == [], "containers left behind"
