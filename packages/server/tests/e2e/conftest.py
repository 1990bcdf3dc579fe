"""e2e fixtures: a real redis-server, and clusters of real API and worker processes.

Skipped when redis-server or bwrap is missing, except in CI (CI=true), where
that is a failure: the suite must not go green by running nothing.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from cluster import Cluster
from redis_server import RedisServer


def _require(binary: str) -> None:
    if shutil.which(binary) is None:
        message = f"{binary} is not installed"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)


@pytest.fixture(scope="session")
def e2e_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    _require("redis-server")
    _require("bwrap")
    server = RedisServer.start(tmp_path_factory.mktemp("e2e-redis"))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def shared_cluster(
    e2e_redis: RedisServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Cluster]:
    """One API-only node and two workers (2 consumers each), shared by a module's tests."""
    cluster = Cluster(e2e_redis.url, tmp_path_factory.mktemp("cluster"))
    try:
        cluster.start_api()
        cluster.start_worker("worker-a")
        cluster.start_worker("worker-b")
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture()
def cluster(e2e_redis: RedisServer, tmp_path: Path) -> Iterator[Cluster]:
    """A cluster of its own (nothing started yet), for tests that kill or starve nodes."""
    own = Cluster(e2e_redis.url, tmp_path)
    yield own
    own.stop()
