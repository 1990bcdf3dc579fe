"""``AsyncPythonExecutorClient`` against a real server."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import aclosing
from pathlib import Path

import anyio
import pytest
from python_executor_client import (
    AsyncPythonExecutorClient,
    BadRequest,
    ConnectionFailed,
    ExecutionStatus,
    LogEventType,
    NotFound,
    PayloadTooLarge,
)


@pytest.fixture()
async def client(server_url: str) -> AsyncIterator[AsyncPythonExecutorClient]:
    async with AsyncPythonExecutorClient(server_url, timeout=60) as c:
        yield c


async def test_files_dict(client: AsyncPythonExecutorClient) -> None:
    result = await client.execute_sync(files={"main.py": "print('async hi')"})
    assert (result.status, result.stdout, result.exit_code) == (
        ExecutionStatus.COMPLETED,
        "async hi\n",
        0,
    )


async def test_directory_is_streamed_from_disk(
    client: AsyncPythonExecutorClient, tmp_path: Path
) -> None:
    (tmp_path / "data.txt").write_text("x" * 300_000)
    (tmp_path / "main.py").write_text("print(len(open('data.txt').read()))\n")
    assert (await client.execute_sync(files=tmp_path)).stdout == "300000\n"


async def test_concurrent_runs(client: AsyncPythonExecutorClient) -> None:
    outputs: list[str] = []

    async def one(n: int) -> None:
        result = await client.execute_sync(files={"main.py": f"print({n})"})
        outputs.append(result.stdout)

    async with anyio.create_task_group() as tg:
        for n in range(3):
            tg.start_soon(one, n)
    assert sorted(outputs) == ["0\n", "1\n", "2\n"]


async def test_async_then_wait(client: AsyncPythonExecutorClient) -> None:
    execution_id = await client.execute_async(files={"main.py": "print('queued')"})
    result = await client.wait_for_completion(execution_id, poll_interval=0.2, max_wait=60)
    assert result.stdout == "queued\n"
    assert (await client.get_execution(execution_id)).execution_id == execution_id


async def test_eval(client: AsyncPythonExecutorClient) -> None:
    assert (await client.eval("[i * i for i in range(4)]")).result == "[0, 1, 4, 9]"


async def test_kill_and_follow(client: AsyncPythonExecutorClient) -> None:
    code = "import time\nprint('started', flush=True)\ntime.sleep(60)"
    execution_id = await client.execute_async(files={"main.py": code})
    async with aclosing(client.follow(execution_id)) as events:
        shown = ""
        while shown != "started\n":  # chunk boundaries are the server's choice
            event = await events.__anext__()
            assert event.type is LogEventType.STDOUT
            shown += event.text
        assert await client.kill(execution_id) == "killed"
        rest = [event async for event in events]
    assert rest[-1].type is LogEventType.EXIT and rest[-1].result is not None
    assert rest[-1].result.status is ExecutionStatus.KILLED


async def test_follow_reconnects_through_silence(server_url: str) -> None:
    code = "import time\nprint('before', flush=True)\ntime.sleep(3)\nprint('after')"
    async with AsyncPythonExecutorClient(server_url, timeout=1) as client:
        execution_id = await client.execute_async(files={"main.py": code})
        events = [event async for event in client.follow(execution_id)]
    assert "".join(e.text for e in events if e.type is LogEventType.STDOUT) == "before\nafter\n"


async def test_list(client: AsyncPythonExecutorClient) -> None:
    done = await client.execute_sync(files={"main.py": "pass"})
    listed = await client.list_executions(limit=50)
    assert done.execution_id in [item.execution_id for item in listed.executions]


async def test_errors_carry_the_servers_message(client: AsyncPythonExecutorClient) -> None:
    with pytest.raises(NotFound) as not_found:
        await client.get_execution("exe_00000000-0000-4000-8000-000000000000")
    assert not_found.value.status_code == 404 and not_found.value.message
    with pytest.raises(BadRequest) as bad:
        await client.execute_sync(files={"main.py": "pass"}, python_version="2.7")
    assert "2.7" in bad.value.message
    with pytest.raises(PayloadTooLarge):
        await client.eval("#" * 200_000)


async def test_unreachable_server(closed_url: str) -> None:
    async with AsyncPythonExecutorClient(closed_url) as client:
        with pytest.raises(ConnectionFailed):
            await client.health()
