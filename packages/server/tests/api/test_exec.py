"""exec/sync and exec/async: multipart uploads into the real sandbox."""

from __future__ import annotations

import gzip
import io
import os
import tarfile
import zipfile
from pathlib import Path

import httpx2
import pytest
from api_helpers import post_exec, run, tar_of
from server_process import ServerProcess

pytestmark = [pytest.mark.sandbox, pytest.mark.timeout(120)]


def test_hello(client: httpx2.Client) -> None:
    body = run(client, {"main.py": "print('hello')"})
    assert body["status"] == "completed"
    assert body["stdout"] == "hello\n"
    assert body["exit_code"] == 0
    assert body["execution_id"].startswith("exe_")
    assert body["started_at"].endswith("Z") and body["finished_at"].endswith("Z")
    assert isinstance(body["duration_ms"], int)
    assert body["stdout_truncated"] is False


def test_stdin_env_args_pre_commands(client: httpx2.Client) -> None:
    main = (
        "import os, sys\n"
        "print(sys.stdin.read().strip())\n"
        "print(os.environ['A'], os.environ['B'])\n"
        "print(sys.argv[1:])\n"
        "print(open('made-by-pre.txt').read().strip())\n"
    )
    body = run(
        client,
        {"main.py": main},
        stdin="line from stdin\n",
        env_vars=["A=1", "B=two words"],
        script_args=["--flag", "with space"],
        pre_commands=["echo pre-one", "echo made > made-by-pre.txt"],
    )
    assert (
        body["stdout"] == "pre-one\nline from stdin\n1 two words\n['--flag', 'with space']\nmade\n"
    )


def test_failing_pre_command_stops_the_run(client: httpx2.Client) -> None:
    body = run(
        client,
        {"main.py": "print('should not run')"},
        pre_commands=["echo before", "echo oops >&2; exit 7", "echo never"],
    )
    assert body["status"] == "completed"
    assert body["exit_code"] == 7
    assert body["stdout"] == "before\n"
    assert "oops" in body["stderr"]


def test_nested_packages_and_explicit_entrypoint(client: httpx2.Client) -> None:
    files = {
        "app/__init__.py": "",
        "app/core/__init__.py": "",
        "app/core/calc.py": "def add(a, b):\n    return a + b\n",
        "bin/start.py": (
            "import sys, os\n"
            "sys.path.insert(0, os.getcwd())\n"
            "from app.core.calc import add\n"
            "print(add(2, 3))\n"
        ),
        "main.py": "print('not me')",
    }
    assert run(client, files, entrypoint="bin/start.py")["stdout"] == "5\n"


@pytest.mark.parametrize(
    ("files", "expected"),
    [
        (
            {"main.py": "print('main')", "__main__.py": "print('dunder')", "a.py": "print('a')"},
            "main",
        ),
        ({"__main__.py": "print('dunder')", "a.py": "print('a')"}, "dunder"),
        ({"zeta.py": "print('zeta')", "alpha.py": "print('alpha')"}, "zeta"),
    ],
)
def test_entrypoint_auto_detection(
    client: httpx2.Client, files: dict[str, str], expected: str
) -> None:
    assert run(client, files)["stdout"] == expected + "\n"


def test_eval_last_expr_in_exec(client: httpx2.Client) -> None:
    body = run(client, {"main.py": "a = 20\na + 22"}, eval_last_expr=True)
    assert body["result"] == "42"


def uploads_left(server: ServerProcess) -> list[str]:
    uploads = server.data_dir / "uploads"
    return sorted(os.listdir(uploads)) if uploads.exists() else []


def _gz(data: bytes) -> bytes:
    return gzip.compress(data)


def _zip() -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("main.py", "print(1)")
    return buf.getvalue()


def _hardlink_tar() -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        info = tarfile.TarInfo("main.py")
        info.type = tarfile.LNKTYPE
        info.linkname = "/etc/passwd"
        tar.addfile(info)
    return buf.getvalue()


@pytest.mark.parametrize(
    ("tar", "fragment"),
    [
        (tar_of({"../escape.py": "print(1)"}), "../escape.py"),
        (tar_of({"/abs/main.py": "print(1)"}), "/abs/main.py"),
        (tar_of({"main.py": "1"}, links={"link": "/etc"}), "link"),
        (tar_of({"main.py": "1"}, links={"up": "../../.."}), "up"),
        (tar_of({"dir/f.py": "1"}, links={"dir/link": "/etc/passwd"}), "dir/link"),
        (_hardlink_tar(), "main.py"),
        (_gz(tar_of({"main.py": "1"})), "uncompressed tar"),
        (_zip(), "uncompressed tar"),
        (tar_of({"data.txt": "no python here"}), "entrypoint"),
        (b"this is not a tar archive at all" * 40, "tar"),
    ],
)
def test_rejected_archives(
    client: httpx2.Client, server: ServerProcess, tar: bytes, fragment: str
) -> None:
    before = uploads_left(server)
    response = post_exec(client, tar, {})
    assert response.status_code == 400, response.text
    assert fragment in response.json()["error"]
    assert uploads_left(server) == before


def test_symlink_then_write_through_it_rejected(
    client: httpx2.Client, server: ServerProcess
) -> None:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        link = tarfile.TarInfo("sub")
        link.type = tarfile.SYMTYPE
        link.linkname = "/tmp"
        tar.addfile(link)
        data = b"owned"
        info = tarfile.TarInfo("sub/pwned.txt")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    response = post_exec(client, buf.getvalue(), {})
    assert response.status_code == 400
    assert not Path("/tmp/pwned.txt").exists()


@pytest.mark.parametrize(
    ("metadata", "fragment"),
    [
        (None, "metadata"),
        ("{not json", "metadata"),
        ({"config": {"disk_mb": 0}}, "disk_mb"),
        ({"python_version": "1.0"}, "available"),
        ({"entrypoint": "nope.py"}, "entrypoint"),
    ],
)
def test_bad_metadata(
    client: httpx2.Client, server: ServerProcess, metadata: object, fragment: str
) -> None:
    before = uploads_left(server)
    response = post_exec(client, tar_of({"main.py": "print(1)"}), metadata)  # type: ignore[arg-type]
    assert response.status_code == 400, response.text
    assert fragment in response.json()["error"]
    assert uploads_left(server) == before


def test_not_multipart(client: httpx2.Client) -> None:
    response = client.post("/api/v1/exec/sync", json={"code": "1"})
    assert response.status_code == 400
    assert "error" in response.json()
