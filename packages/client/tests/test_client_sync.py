"""``PythonExecutorClient`` against a real server."""

from __future__ import annotations

import io
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from python_executor_client import (
    BadRequest,
    ConnectionFailed,
    ExecutionStatus,
    ExecutionTimeout,
    LogEventType,
    Metadata,
    NotFound,
    PayloadTooLarge,
    PythonExecutorClient,
)

ARGV = "import json, sys; print(json.dumps(sys.argv[1:]))"


@pytest.fixture()
def client(server_url: str) -> Iterator[PythonExecutorClient]:
    with PythonExecutorClient(server_url, timeout=60) as c:
        yield c


def _tar(files: dict[str, str]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for name, text in files.items():
            data = text.encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def test_files_dict_with_a_helper_module(client: PythonExecutorClient) -> None:
    result = client.execute_sync(
        files={
            "main.py": "from helper import greet; greet()",
            "helper.py": "def greet(): print('hi')",
        }
    )
    assert (result.status, result.exit_code, result.stdout) == (
        ExecutionStatus.COMPLETED,
        0,
        "hi\n",
    )
    assert result.execution_id.startswith("exe_") and result.started_at is not None


def test_directory_as_path_and_as_string(client: PythonExecutorClient, tmp_path: Path) -> None:
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "__init__.py").write_text("")
    (tmp_path / "pkg" / "util.py").write_text("NAME = 'util'\n")
    (tmp_path / "main.py").write_text("from pkg.util import NAME; print(NAME)\n")
    assert client.execute_sync(files=tmp_path).stdout == "util\n"
    assert client.execute_sync(files=str(tmp_path)).stdout == "util\n"


def test_single_file_path(client: PythonExecutorClient, tmp_path: Path) -> None:
    script = tmp_path / "hello.py"
    script.write_text("print('single')\n")
    assert client.execute_sync(files=script).stdout == "single\n"


def test_tar_bytes_and_tar_path(client: PythonExecutorClient, tmp_path: Path) -> None:
    data = _tar({"app/__main__.py": "print('from tar')"})
    assert client.execute_sync(tar_data=data, entrypoint="app/__main__.py").stdout == "from tar\n"
    (tmp_path / "code.tar").write_bytes(_tar({"main.py": "print('tar file')"}))
    assert client.execute_sync(tar_data=tmp_path / "code.tar").stdout == "tar file\n"


def test_options_reach_the_program(client: PythonExecutorClient) -> None:
    code = ARGV + "\nimport os; print(os.environ['GREETING']); print(input())"
    result = client.execute_sync(
        files={"main.py": code},
        script_args=["a b", "--flag"],
        env_vars={"GREETING": "hello there"},
        stdin="typed line\n",
        timeout_seconds=30,
    )
    assert result.stdout.splitlines() == ['["a b", "--flag"]', "hello there", "typed line"]


def test_metadata_object_and_keywords_combine(client: PythonExecutorClient) -> None:
    result = client.execute_sync(
        files={"other.py": "import sys; print(sys.argv[1])", "main.py": "print('wrong')"},
        metadata=Metadata(entrypoint="other.py"),
        script_args=["chosen"],
    )
    assert result.stdout == "chosen\n"


def test_non_zero_exit_is_completed_with_error_type(client: PythonExecutorClient) -> None:
    result = client.execute_sync(files={"main.py": "x = 1\nraise KeyError('k')\n"})
    assert result.status is ExecutionStatus.COMPLETED and result.exit_code == 1
    assert result.error_type == "KeyError" and result.error_line == 2


def test_timeout_is_a_failed_run(client: PythonExecutorClient) -> None:
    result = client.execute_sync(
        files={"main.py": "import time\nprint('before', flush=True)\ntime.sleep(30)"},
        timeout_seconds=1,
    )
    assert result.status is ExecutionStatus.FAILED and "timed out" in (result.error or "")
    assert result.stdout == "before\n"


def test_async_then_wait_and_get(client: PythonExecutorClient) -> None:
    execution_id = client.execute_async(files={"main.py": "print('later')"})
    result = client.wait_for_completion(execution_id, poll_interval=0.2, max_wait=60)
    assert result.stdout == "later\n" and result.execution_id == execution_id
    assert client.get_execution(execution_id).status is ExecutionStatus.COMPLETED


def test_wait_for_completion_gives_up_after_max_wait(client: PythonExecutorClient) -> None:
    execution_id = client.execute_async(files={"main.py": "import time; time.sleep(30)"})
    with pytest.raises(ExecutionTimeout) as caught:
        client.wait_for_completion(execution_id, poll_interval=0.1, max_wait=0.5)
    assert isinstance(caught.value, TimeoutError)
    client.kill(execution_id)


def test_kill_a_running_execution(client: PythonExecutorClient) -> None:
    execution_id = client.execute_async(files={"main.py": "import time; time.sleep(60)"})
    _wait_until_running(client, execution_id)
    assert client.kill(execution_id) == "killed"
    result = client.wait_for_completion(execution_id, poll_interval=0.2, max_wait=30)
    assert result.status is ExecutionStatus.KILLED
    assert client.kill(execution_id) == "killed"  # already finished: its status


def test_kill_of_a_finished_execution_returns_its_status(client: PythonExecutorClient) -> None:
    result = client.execute_sync(files={"main.py": "pass"})
    assert client.kill(result.execution_id) == "completed"


def test_eval_last_expression(client: PythonExecutorClient) -> None:
    result = client.eval("x = 5\nprint('side')\nx * 2")
    assert result.result == "10" and result.stdout == "side\n"
    assert client.eval("6 * 7", eval_last_expr=False).result is None
    assert client.eval("input().upper()", stdin="abc\n").result == "'ABC'"


def test_eval_with_files(client: PythonExecutorClient) -> None:
    files = [
        {"name": "lib.py", "content": "V = 3"},
        {"name": "run.py", "content": "import lib; lib.V + 1"},
    ]
    assert client.eval("", files=files, entrypoint="run.py").result == "4"


def test_list_executions(client: PythonExecutorClient) -> None:
    done = client.execute_sync(files={"main.py": "print(1)"})
    listed = client.list_executions(limit=50)
    assert done.execution_id in [item.execution_id for item in listed.executions]
    completed = client.list_executions(status="completed", limit=50).executions
    assert completed and all(item.status is ExecutionStatus.COMPLETED for item in completed)


def test_follow_yields_output_while_running(client: PythonExecutorClient) -> None:
    code = (
        "import sys, time\nprint('one', flush=True)\ntime.sleep(2)\n"
        "print('err', file=sys.stderr)\nprint('two')\nsys.exit(4)"
    )
    execution_id = client.execute_async(files={"main.py": code})
    events = client.follow(execution_id)
    shown = ""
    while shown != "one\n":  # chunk boundaries are the server's choice
        event = next(events)
        assert event.type is LogEventType.STDOUT
        shown += event.text
    assert client.get_execution(execution_id).status is ExecutionStatus.RUNNING
    rest = list(events)
    stdout = shown + "".join(e.text for e in rest if e.type is LogEventType.STDOUT)
    assert stdout == "one\ntwo\n"
    assert "".join(e.text for e in rest if e.type is LogEventType.STDERR) == "err\n"
    assert rest[-1].type is LogEventType.EXIT and rest[-1].result is not None
    assert rest[-1].result.exit_code == 4


def test_follow_reconnects_through_silence_without_repeating(server_url: str) -> None:
    code = "import time\nprint('before', flush=True)\ntime.sleep(3)\nprint('after')"
    with PythonExecutorClient(server_url, timeout=1) as client:  # the stream times out
        execution_id = client.execute_async(files={"main.py": code})
        events = list(client.follow(execution_id))
    assert "".join(e.text for e in events if e.type is LogEventType.STDOUT) == "before\nafter\n"
    assert [e.type for e in events].count(LogEventType.EXIT) == 1


def test_follow_a_finished_execution(client: PythonExecutorClient) -> None:
    done = client.execute_sync(files={"main.py": "print('over')"})
    events = list(client.follow(done.execution_id))
    assert "".join(e.text for e in events if e.type is LogEventType.STDOUT) == "over\n"
    assert events[-1].type is LogEventType.EXIT


def test_health(client: PythonExecutorClient) -> None:
    assert client.health()["status"] == "ok"


def test_unknown_id_is_not_found_with_the_servers_message(client: PythonExecutorClient) -> None:
    for call in (client.get_execution, client.kill, lambda i: list(client.follow(i))):
        with pytest.raises(NotFound) as caught:
            call("exe_00000000-0000-4000-8000-000000000000")
        assert caught.value.status_code == 404 and caught.value.message


def test_bad_requests_carry_the_servers_message(client: PythonExecutorClient) -> None:
    with pytest.raises(BadRequest) as caught:
        client.execute_sync(files={"main.py": "pass"}, python_version="2.7")
    assert caught.value.status_code == 400 and "2.7" in caught.value.message
    with pytest.raises(BadRequest, match="entrypoint"):
        client.execute_sync(files={"main.py": "pass"}, entrypoint="absent.py")
    with pytest.raises(BadRequest, match=r"\.\./evil\.py"):
        client.execute_sync(files={"../evil.py": "pass"}, entrypoint="main.py")
    with pytest.raises(BadRequest, match="tar"):
        client.execute_sync(tar_data=b"\x1f\x8b" + bytes(600), entrypoint="main.py")


def test_payload_too_large(client: PythonExecutorClient, tmp_path: Path, upload_limit: int) -> None:
    with pytest.raises(PayloadTooLarge) as caught:
        client.eval("x = 1\n" + "#" * 200_000)
    assert caught.value.status_code == 413 and caught.value.message
    with open(tmp_path / "blob.bin", "wb") as blob:
        blob.truncate(upload_limit + 1024 * 1024)
    (tmp_path / "main.py").write_text("print(1)\n")
    with pytest.raises(PayloadTooLarge):
        client.execute_sync(files=tmp_path)


def test_unreachable_server(closed_url: str) -> None:
    with PythonExecutorClient(closed_url) as client, pytest.raises(ConnectionFailed) as caught:
        client.get_execution("exe_x")
    assert closed_url in caught.value.message


def _wait_until_running(client: PythonExecutorClient, execution_id: str) -> None:
    deadline = time.monotonic() + 30
    while client.get_execution(execution_id).status is not ExecutionStatus.RUNNING:
        assert time.monotonic() < deadline, "the execution never started"
        time.sleep(0.1)
