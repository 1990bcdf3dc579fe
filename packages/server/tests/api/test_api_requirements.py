"""Requirements through the API: installed by the server, cached, the run offline."""

from __future__ import annotations

import contextlib
import socket
import threading
import time

import httpx2
import pytest
from api_helpers import eval_, run

pytestmark = [pytest.mark.sandbox, pytest.mark.timeout(300)]


def test_requirements_installed_and_cached(client: httpx2.Client) -> None:
    code = "import six\nprint(six.__name__)"
    first = eval_(client, code, requirements_txt="six")
    assert first["status"] == "completed", first
    assert first["stdout"] == "six\n"
    started = time.monotonic()
    second = eval_(client, code, requirements_txt="six\n")
    assert second["stdout"] == "six\n"
    assert time.monotonic() - started < 10  # a cache hit, not a second install


def test_auto_detected_import(client: httpx2.Client) -> None:
    body = eval_(client, "import yaml\nprint(yaml.safe_load('a: 1'))")
    assert body["stdout"] == "{'a': 1}\n", body


def test_auto_detect_off_with_dash(client: httpx2.Client) -> None:
    body = eval_(client, "import colorama", requirements_txt="-")
    assert body["exit_code"] == 1
    assert body["error_type"] == "ModuleNotFoundError"


def test_unknown_import_is_the_programs_own_error(client: httpx2.Client) -> None:
    body = eval_(client, "import surely_no_such_module_xyz")
    assert body["status"] == "completed"
    assert body["error_type"] == "ModuleNotFoundError"


@pytest.mark.parametrize(
    "line",
    [
        "-i http://10.0.0.1/simple",
        "--index-url=http://x",
        "-r other.txt",
        "-e .",
        "git+https://example.invalid/x.git",
        "pkg @ file:///etc/passwd",
        "./local/path",
        "/abs/path.whl",
    ],
)
def test_bad_requirement_lines_rejected(client: httpx2.Client, line: str) -> None:
    response = client.post("/api/v1/eval", json={"code": "1", "requirements_txt": f"six\n{line}\n"})
    assert response.status_code == 400, response.text
    assert line.split()[0].split("=")[0] in response.json()["error"]


def test_uninstallable_requirement_fails_the_run(client: httpx2.Client) -> None:
    body = run(
        client,
        {"main.py": "print('never')"},
        requirements_txt="no-such-package-pyexec-test-zzz==1.0",
    )
    assert body["status"] == "failed"
    assert "no-such-package-pyexec-test-zzz" in body["error"]
    assert body["stdout"] == ""


def test_run_stays_offline_after_install(client: httpx2.Client) -> None:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    port = listener.getsockname()[1]
    accepted: list[object] = []

    def accept() -> None:
        with contextlib.suppress(OSError):  # closed by the test when the run is over
            accepted.append(listener.accept())

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    code = (
        "import six, socket\n"
        "try:\n"
        f"    socket.create_connection(('127.0.0.1', {port}), timeout=2)\n"
        "    print('connected')\n"
        "except OSError as exc:\n"
        "    print('refused', type(exc).__name__)\n"
    )
    body = eval_(client, code, requirements_txt="six")
    listener.shutdown(socket.SHUT_RDWR)  # wakes the blocked accept()
    thread.join(5)
    listener.close()
    assert body["stdout"].startswith("refused"), body
    assert not accepted
