"""The driver's job mode (``--job-fd``), run for real by every interpreter found here:
what a run started ahead of its job gets must be what the command line gives."""

from __future__ import annotations

import json
import os
import socket
import subprocess
from pathlib import Path

import pytest
from python_executor_server.execution.driver import PRESTART, driver_argv, parse_report
from python_executor_server.execution.interpreters import discover_interpreters
from python_executor_server.sandbox.base import encode_job
from python_executor_server.settings import Settings

INTERPRETERS = discover_interpreters(Settings())
LAUNCH_ENV = {"LANG": "C.UTF-8"}
JOB_ENV = {
    "PATH": os.environ["PATH"],
    "LANG": "C.UTF-8",
    "PYTHONUNBUFFERED": "1",
    "EMPTY": "",
    "WITH_EQUALS": "a=b=c",
    "UNICODE": "héllo ✓",
}
PROGRAM = """
import json, os, subprocess, sys
child = subprocess.run(['env', '-0'], capture_output=True).stdout.decode().split('\\0')
print(json.dumps({
    'argv': sys.argv,
    'environ': dict(os.environ),
    'child_environ': sorted(e for e in child if e),
    'fds': sorted(int(fd) for fd in os.listdir('/proc/self/fd')),
}))
6 * 7
"""


@pytest.fixture(params=[str(i.executable) for i in INTERPRETERS.values()], ids=list(INTERPRETERS))
def python(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def _argv(python: str, main: Path, args: tuple[str, ...], result_fd: int) -> tuple[str, ...]:
    return driver_argv(
        python,
        entrypoint=str(main),
        args=args,
        eval_last_expr=True,
        pre_commands=(),
        result_fd=result_fd,
    )


def _job_run(
    python: str, main: Path, args: tuple[str, ...], *, send: bool = True
) -> tuple[int, str, bytes]:
    """Start the driver's launch prefix, check that it reports ready, then send it the job
    of ``main`` with ``args`` and ``JOB_ENV`` (``send`` False: close the socket instead).
    Returns the exit code, stdout and what it wrote to its result pipe."""
    ours, theirs = socket.socketpair()
    side_r, side_w = os.pipe()
    argv = _argv(python, main, args, side_w)
    with subprocess.Popen(
        [*argv[:PRESTART], "--job-fd", str(theirs.fileno())],
        pass_fds=(theirs.fileno(), side_w),
        stdout=subprocess.PIPE,
        env=LAUNCH_ENV,
    ) as proc:
        theirs.close()
        os.close(side_w)
        ours.settimeout(30)
        assert ours.recv(1) == b"."  # ready before any job was sent
        if send:
            ours.sendall(encode_job(argv[PRESTART:], JOB_ENV))
        ours.close()
        out, _ = proc.communicate(timeout=30)
    with os.fdopen(side_r, "rb") as side:
        return proc.returncode, out.decode(), side.read()


def test_a_job_runs_as_its_command_line_would(python: str, tmp_path: Path) -> None:
    main = tmp_path / "main.py"
    main.write_text(PROGRAM)
    args = ("", "--", "x=y", "ünï")
    side_r, side_w = os.pipe()
    direct = subprocess.run(
        _argv(python, main, args, side_w), pass_fds=(side_w,), capture_output=True, env=JOB_ENV
    )
    os.close(side_w)
    with os.fdopen(side_r, "rb") as side:
        direct_report = side.read()
    code, output, report = _job_run(python, main, args)
    assert direct.returncode == 0 and code == 0, output
    seen, expected = json.loads(output), json.loads(direct.stdout)
    assert seen["argv"] == expected["argv"] == [str(main), *args]
    assert seen["environ"] == JOB_ENV  # exactly the job's: LANG from the launch is not extra
    assert expected["environ"] == JOB_ENV
    assert seen["child_environ"] == expected["child_environ"]  # the C environment too
    assert parse_report(report).result == parse_report(direct_report).result == "42"


def test_the_job_socket_is_closed_before_the_program_runs(python: str, tmp_path: Path) -> None:
    main = tmp_path / "main.py"
    main.write_text(PROGRAM)
    code, output, _ = _job_run(python, main, ())
    assert code == 0, output
    fds = json.loads(output)["fds"]
    assert len(fds) == 5  # stdin, stdout, stderr, the result pipe, listdir's own


def test_no_job_means_nothing_runs(python: str, tmp_path: Path) -> None:
    main = tmp_path / "main.py"
    main.write_text("open('ran', 'w').close()\n")
    code, _, report = _job_run(python, main, (), send=False)
    assert code == 125 and report == b""
    assert not (tmp_path / "ran").exists()


def test_encode_job_refuses_nul() -> None:
    with pytest.raises(ValueError, match="NUL"):
        encode_job(["a\0b"], {})
    with pytest.raises(ValueError, match="NUL"):
        encode_job([], {"K": "v\0"})


def test_encode_job_is_length_prefixed() -> None:
    job = encode_job(["", "b"], {"K": "v=w"})
    header, _, body = job.partition(b"\n")
    assert int(header) == len(body)
    assert body.split(b"\0") == [b"2", b"", b"b", b"K=v=w"]
