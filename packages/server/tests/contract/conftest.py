"""Fixtures for the contract suites: a real redis-server, and every state store.

``store`` is parametrized over memory, sqlite (a file in tmp_path) and redis
(a redis-server of our own on a free loopback port, a fresh namespace per
test); each is built by ``create_store`` from ``Settings``, as the server does.
``second_store`` is another instance over the same data (for memory, which
has no shared backing, the same instance): two actors racing.
"""

from __future__ import annotations

import shutil
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from python_executor_server.settings import Settings
from python_executor_server.store import StateStore, create_store
from redis_server import RedisServer


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """URL of a redis-server started for this test session (stopped at the end)."""
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.skip("redis-server is not installed (apt-get install redis-server)")
    server = RedisServer.start(tmp_path_factory.mktemp("redis"), binary)
    yield server.url
    server.stop()


def _settings(kind: str, request: pytest.FixtureRequest, tmp_path: Path) -> Settings:
    if kind == "redis":
        url = request.getfixturevalue("redis_url")
        namespace = f"test-{uuid.uuid4().hex[:12]}"
        return Settings(store="redis", redis_url=url, redis_namespace=namespace)
    return Settings.model_validate({"store": kind, "data_dir": tmp_path / "data"})


@pytest.fixture(
    params=["memory", "sqlite", pytest.param("redis", marks=pytest.mark.redis)],
)
def store_settings(request: pytest.FixtureRequest, tmp_path: Path) -> Settings:
    return _settings(str(request.param), request, tmp_path)


@pytest.fixture()
async def store(store_settings: Settings) -> AsyncIterator[StateStore]:
    opened = create_store(store_settings)
    await opened.open()
    yield opened
    await opened.close()


@pytest.fixture()
async def second_store(store_settings: Settings, store: StateStore) -> AsyncIterator[StateStore]:
    if store.name == "memory":
        yield store
        return
    other = create_store(store_settings)
    await other.open()
    yield other
    await other.close()
