"""Server-wide settings observed over HTTP: upload cap, retention, kept work dirs."""

from __future__ import annotations

import os
import time
from pathlib import Path

import httpx2
import pytest
from api_helpers import eval_, post_exec, tar_of
from server_process import ServerProcess

pytestmark = [pytest.mark.sandbox, pytest.mark.timeout(120)]


def test_upload_over_the_maximum_is_413_and_leaves_nothing(
    make_server: type[ServerProcess],
) -> None:
    server = make_server({"PYEXEC_MAX_UPLOAD_BYTES": str(1 << 20)}).start()
    big = tar_of({"main.py": "print(1)", "blob.bin": os.urandom(2 << 20)})
    with httpx2.Client(base_url=server.url, timeout=60) as c:
        response = post_exec(c, big, {})
        assert response.status_code == 413
        assert "error" in response.json()
        assert list((server.data_dir / "uploads").iterdir()) == []
        assert c.get("/api/v1/executions").json()["executions"] == []
        small = post_exec(c, tar_of({"main.py": "print('fits')"}), {})
        assert small.json()["stdout"] == "fits\n"


def _workspace_dirs(run_dir: Path) -> set[str]:
    return {p.name for p in run_dir.iterdir() if p.name.startswith("exe_")}


def test_retention_deletes_records_and_kept_workdirs(make_server: type[ServerProcess]) -> None:
    server = make_server({"PYEXEC_CLEANUP_TTL": "1", "PYEXEC_KEEP_WORKDIRS": "true"}).start()
    run_dir = (
        Path(f"/run/pyexec-test-{server.tag}") if os.geteuid() == 0 else server.data_dir / "runs"
    )
    with httpx2.Client(base_url=server.url, timeout=60) as c:
        execution_id = eval_(c, "open('kept.txt', 'w').write('x')")["execution_id"]
        assert execution_id in _workspace_dirs(run_dir)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            if c.get(f"/api/v1/executions/{execution_id}").status_code == 404:
                break
            time.sleep(0.2)
        assert c.get(f"/api/v1/executions/{execution_id}").status_code == 404
        assert execution_id not in _workspace_dirs(run_dir)


def test_workdirs_removed_right_away_by_default(
    client: httpx2.Client, server: ServerProcess
) -> None:
    run_dir = (
        Path(f"/run/pyexec-test-{server.tag}") if os.geteuid() == 0 else server.data_dir / "runs"
    )
    execution_id = eval_(client, "open('f.txt', 'w').write('x')")["execution_id"]
    assert execution_id not in _workspace_dirs(run_dir)
