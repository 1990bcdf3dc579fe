"""create_store: each configured store is built, the rest fail with a clear error."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from python_executor_server.settings import Settings
from python_executor_server.store import StoreUnavailable, create_store
from python_executor_server.store.base import ExecutionRecord


async def test_sqlite_store_lives_in_the_data_dir_which_it_creates(tmp_path: Path) -> None:
    data_dir = tmp_path / "a" / "b"
    store = create_store(Settings(store="sqlite", data_dir=data_dir))
    assert store.name == "sqlite"
    await store.open()
    try:
        await store.create(ExecutionRecord.new(request={}))
    finally:
        await store.close()
    assert (data_dir / "executions.db").is_file()


async def test_memory_store() -> None:
    store = create_store(Settings(store="memory"))
    await store.open()
    assert store.name == "memory"
    await store.close()


async def test_unusable_data_dir_is_a_clear_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    store = create_store(Settings(store="sqlite", data_dir=blocker))
    with pytest.raises(StoreUnavailable, match="cannot open the SQLite store"):
        await store.open()


def test_unimplemented_store_is_a_clear_error() -> None:
    with pytest.raises(StoreUnavailable, match="'consul' is not available; choose one of"):
        create_store(Settings(store="consul"))


async def test_unreachable_redis_is_a_clear_error() -> None:
    import socket

    with socket.socket() as s:  # a port nobody listens on: bound, never listening
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        store = create_store(
            Settings(store="redis", redis_url=f"redis://user:secret@127.0.0.1:{port}/0")
        )
        with pytest.raises(StoreUnavailable, match="cannot reach Redis at") as info:
            await store.open()
        await store.close()
    assert "secret" not in str(info.value)


def test_malformed_redis_url_is_a_clear_error() -> None:
    with pytest.raises(StoreUnavailable, match="invalid redis_url"):
        create_store(Settings(store="redis", redis_url="http://127.0.0.1:6379"))


def test_missing_redis_package_says_what_to_install() -> None:
    script = textwrap.dedent(
        """
        import sys
        sys.modules["redis"] = None  # what an environment without the package sees
        from python_executor_server.settings import Settings
        from python_executor_server.store import StoreUnavailable, create_store
        try:
            create_store(Settings(store="redis"))
        except StoreUnavailable as exc:
            print(exc)
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=60
    )
    assert "pip install 'python-executor-server[redis]'" in out.stdout
