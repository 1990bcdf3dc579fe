"""The host installer process: its timeout kills the whole process group; its output is kept."""

from __future__ import annotations

import os
import time
from pathlib import Path

import anyio
import pytest
from python_executor_server.execution.installer import HostInstaller, InstallJob
from python_executor_server.sandbox.base import Interpreter

pytestmark = [pytest.mark.sandbox, pytest.mark.timeout(60)]

INTERP = Interpreter("3.12", Path("/usr/bin/python3"), Path("/usr"))


def job(tmp_path: Path, script: str, timeout: float) -> InstallJob:
    return InstallJob(
        key="k" * 64,
        argv=("/bin/sh", "-c", script),
        env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)},
        interpreter=INTERP,
        writable=(tmp_path,),
        readable=(),
        timeout=timeout,
    )


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat").read_text()
    return stat.split(") ", 1)[1][0] != "Z"


async def test_timeout_kills_the_installer_and_its_children(tmp_path: Path) -> None:
    pidfile = tmp_path / "child.pid"
    script = f"sleep 300 & echo $! > {pidfile}; echo started; wait"
    started = time.monotonic()
    result = await HostInstaller().install(job(tmp_path, script, timeout=1.0))

    assert result.timed_out and not result.ok
    assert time.monotonic() - started < 10
    assert "started" in result.output
    child = int(pidfile.read_text())
    for _ in range(100):  # killed at once; reaped by init a moment later
        if not alive(child):
            break
        await anyio.sleep(0.05)
    assert not alive(child)


async def test_exit_code_and_the_tail_of_the_output_are_reported(tmp_path: Path) -> None:
    script = "i=0; while [ $i -lt 20000 ]; do echo line$i; i=$((i+1)); done; echo LAST >&2; exit 3"
    result = await HostInstaller().install(job(tmp_path, script, timeout=30))
    assert result.exit_code == 3 and not result.ok and not result.timed_out
    assert result.output.rstrip().endswith("LAST")  # stderr is merged; the tail is kept
    assert "line0\n" not in result.output  # the head was dropped beyond the cap


async def test_an_installer_that_cannot_start_is_an_error_result(tmp_path: Path) -> None:
    bad = InstallJob(
        key="k" * 64,
        argv=(str(tmp_path / "no-such-binary"),),
        env={"HOME": str(tmp_path)},
        interpreter=INTERP,
        writable=(),
        readable=(),
        timeout=5,
    )
    result = await HostInstaller().install(bad)
    assert not result.ok and result.error is not None and "could not start" in result.error
