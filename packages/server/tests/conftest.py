from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx2
import pytest
from server_process import ServerProcess


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    proc = ServerProcess(tmp_path_factory.mktemp("server") / "data").start()
    yield proc
    proc.stop()


@pytest.fixture()
def client(server: ServerProcess) -> Iterator[httpx2.Client]:
    with httpx2.Client(base_url=server.url, timeout=120) as c:
        yield c


@pytest.fixture()
def make_server(tmp_path: Path) -> Iterator[type[ServerProcess]]:
    started: list[ServerProcess] = []

    class _Factory(ServerProcess):
        def __init__(self, env: dict[str, str] | None = None, data_dir: Path | None = None) -> None:
            super().__init__(data_dir or tmp_path / "data", env or {})
            started.append(self)

    yield _Factory
    for proc in started:
        proc.stop()
