"""The Docker backend against a real daemon: runs, the contract details, the warm pool.

Hostile programs are in ``test_docker_hostile.py``; pure logic in
``test_docker_unit.py``.
"""

from __future__ import annotations

import hashlib
import json
import socket
import struct
from pathlib import Path
from typing import Any

import anyio
import pytest
from docker_support import (
    HOST_PYTHON,
    INSTANCE,
    docker_settings,
    make_spec,
    our_containers,
    run,
    wait_gone,
)
from python_executor_server.sandbox.docker import DockerBackend, default_limits
from python_executor_server.sandbox.docker_pool import Profile
from python_executor_server.sandbox.docker_protocol import encode_job

pytest_plugins = ["conftest_docker"]
pytestmark = [pytest.mark.docker, pytest.mark.timeout(90)]


async def test_hello_world(docker_backend: DockerBackend, docker_api: Any) -> None:
    spec = await make_spec(docker_backend, "print('hello')")
    outcome, out = await run(docker_backend, spec)
    assert (outcome.exit_code, outcome.error, out.text("stdout")) == (0, None, "hello\n")
    assert outcome.cpu_ms is not None and outcome.peak_memory_mb and outcome.peak_memory_mb > 1
    assert wait_gone(docker_api, spec.execution_id) == []


async def test_interpreter_argv_is_mapped_and_args_kept(docker_backend: DockerBackend) -> None:
    code = "import sys; print(sys.executable, sys.argv[1:])"
    spec = await make_spec(
        docker_backend, code, argv=(str(HOST_PYTHON), "-I", "main.py", "a", "b c")
    )
    outcome, out = await run(docker_backend, spec)
    assert outcome.exit_code == 0
    assert out.text("stdout") == "/usr/bin/python3 ['a', 'b c']\n"


async def test_non_python_argv0_is_kept(docker_backend: DockerBackend) -> None:
    spec = await make_spec(docker_backend, "", argv=("/bin/sh", "-c", "echo from-sh; exit 4"))
    outcome, out = await run(docker_backend, spec)
    assert (outcome.exit_code, out.text("stdout")) == (4, "from-sh\n")


async def test_env_is_exactly_the_spec_env(docker_backend: DockerBackend) -> None:
    # LANG is set: with no locale at all Python itself adds LC_CTYPE (PEP 538)
    env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "GREETING": "hi there", "EMPTY": ""}
    code = "import json, os; print(json.dumps(dict(os.environ)))"
    outcome, out = await run(docker_backend, await make_spec(docker_backend, code, env=env))
    assert outcome.exit_code == 0
    assert json.loads(out.text("stdout")) == env  # no HOSTNAME, no image ENV


async def test_runs_as_1000_without_capabilities(docker_backend: DockerBackend) -> None:
    code = (
        "import os\n"
        "lines = open('/proc/self/status').read().splitlines()\n"
        "status = dict(l.split(':\\t') for l in lines if ':\\t' in l)\n"
        "print(os.getuid(), os.getgid(), set(os.getgroups()) <= {1000}, os.getcwd(),\n"
        "      status['CapEff'], status['NoNewPrivs'])\n"
    )
    _outcome, out = await run(docker_backend, await make_spec(docker_backend, code))
    assert out.text("stdout") == "1000 1000 True /work 0000000000000000 1\n", out.text("stderr")


async def test_project_files_are_in_work(docker_backend: DockerBackend) -> None:
    files = {"pkg/__init__.py": "", "pkg/util.py": "def twice(x):\n    return 2 * x\n"}
    code = (
        "import os\nfrom pkg.util import twice\n"
        "print(twice(21), sorted(os.listdir('.')), os.stat('main.py').st_uid)"
    )
    _outcome, out = await run(docker_backend, await make_spec(docker_backend, code, files=files))
    assert out.text("stdout") == "42 ['main.py', 'pkg'] 1000\n", out.text("stderr")


async def test_stdin_is_fed_then_closed(docker_backend: DockerBackend) -> None:
    data = b"".join(b"line %d\n" % i for i in range(100_000))  # ~1 MiB: more than a pipe holds
    code = (
        "import sys, hashlib\n"
        "d = sys.stdin.buffer.read()\n"
        "print(len(d), hashlib.sha256(d).hexdigest())"
    )
    _outcome, out = await run(docker_backend, await make_spec(docker_backend, code, stdin=data))
    assert out.text("stdout") == f"{len(data)} {hashlib.sha256(data).hexdigest()}\n"


async def test_no_stdin_means_immediate_eof(docker_backend: DockerBackend) -> None:
    _outcome, out = await run(
        docker_backend, await make_spec(docker_backend, "import sys; print(repr(sys.stdin.read()))")
    )
    assert out.text("stdout") == "''\n"


async def test_result_side_channel(docker_backend: DockerBackend) -> None:
    code = "import os\nprint('visible')\nos.write(3, b'{\"result\": \"42\"}')\n"
    outcome, out = await run(docker_backend, await make_spec(docker_backend, code, result_fd=3))
    assert outcome.side_channel == b'{"result": "42"}'
    assert out.text("stdout") == "visible\n"


async def test_program_cannot_forge_frames_or_reach_the_relay(
    docker_backend: DockerBackend,
) -> None:
    fake_exit = b"x" + struct.pack(">I", 15) + b'{"exit_code":0}'
    fake_result = b"r" + struct.pack(">I", 6) + b"forged"
    code = (
        "import os, sys\n"
        f"sys.stdout.buffer.write({fake_result + fake_exit!r}); sys.stdout.flush()\n"
        "for path in ('/proc/1/fd/1', '/proc/1/mem', '/proc/1/environ'):\n"
        "    try:\n"
        "        open(path, 'rb').close(); print('OPENED', path)\n"
        "    except OSError as e:\n"
        "        print(type(e).__name__)\n"
        "sys.exit(7)\n"
    )
    outcome, out = await run(docker_backend, await make_spec(docker_backend, code, result_fd=3))
    assert outcome.exit_code == 7 and outcome.side_channel == b""
    assert out.chunks["stdout"].startswith(fake_result + fake_exit)
    assert "OPENED" not in out.text("stdout"), out.text("stdout")


async def test_exit_codes_and_signals(docker_backend: DockerBackend) -> None:
    outcome, _ = await run(docker_backend, await make_spec(docker_backend, "raise SystemExit(3)"))
    assert outcome.exit_code == 3
    outcome, _ = await run(
        docker_backend, await make_spec(docker_backend, "import os; os.kill(os.getpid(), 9)")
    )
    assert (outcome.exit_code, outcome.oom_killed, outcome.timed_out) == (137, False, False)


async def test_traceback_goes_to_stderr(docker_backend: DockerBackend) -> None:
    outcome, out = await run(docker_backend, await make_spec(docker_backend, "print('out')\n1/0\n"))
    assert outcome.exit_code == 1 and out.text("stdout") == "out\n"
    assert "ZeroDivisionError" in out.text("stderr")


async def test_missing_image_is_a_setup_error(docker_backend: DockerBackend) -> None:
    import dataclasses

    spec = dataclasses.replace(
        await make_spec(docker_backend, "print(1)"), image="python-executor-no-such:latest"
    )
    outcome, _ = await run(docker_backend, spec)
    assert outcome.exit_code is None and outcome.error and "never pulls" in outcome.error


async def test_warm_pool_run(warm_backend: DockerBackend, monkeypatch: pytest.MonkeyPatch) -> None:
    settings = warm_backend._settings
    profile = warm_backend.profile(settings.default_image, default_limits(settings))
    assert await warm_backend.wait_warm(profile)
    assert warm_backend._factory is not None
    cold: list[Profile] = []
    real_create = warm_backend._factory.create

    def spy(p: Profile, execution_id: str = "") -> Any:
        if execution_id:  # the pool creates with no execution id; a cold run with its own
            cold.append(p)
        return real_create(p, execution_id)

    monkeypatch.setattr(warm_backend._factory, "create", spy)
    outcome, out = await run(warm_backend, await make_spec(warm_backend, "print('warm')"))
    assert (outcome.exit_code, out.text("stdout"), cold) == (0, "warm\n", [])
    assert await warm_backend.wait_warm(profile)  # refilled in the background


async def test_warm_containers_are_single_use(warm_backend: DockerBackend) -> None:
    settings = warm_backend._settings
    profile = warm_backend.profile(settings.default_image, default_limits(settings))
    leave = "open('/tmp/mark', 'w').write('x'); open('/work/mark', 'w').write('x'); print('left')"
    look = "import os; print(os.path.exists('/tmp/mark'), os.path.exists('/work/mark'))"
    for code, expected in ((leave, "left\n"), (look, "False False\n")):
        assert await warm_backend.wait_warm(profile)
        _outcome, out = await run(warm_backend, await make_spec(warm_backend, code))
        assert out.text("stdout") == expected, out.text("stderr")


async def test_non_default_limits_take_the_cold_path(warm_backend: DockerBackend) -> None:
    spec = await make_spec(warm_backend, "print('cold')", memory_mb=300)
    _outcome, out = await run(warm_backend, spec)
    assert out.text("stdout") == "cold\n"


async def test_dropped_attach_connection_takes_the_container_down(
    docker_backend: DockerBackend, docker_api: Any
) -> None:
    """What a server crash looks like to a container: it exits and is removed."""
    settings = docker_backend._settings
    assert docker_backend._factory is not None
    profile = docker_backend.profile(settings.default_image, default_limits(settings))
    attached = await anyio.to_thread.run_sync(docker_backend._factory.create, profile, "exe_crash")
    job = encode_job(
        ["python3", "-c", "import time; time.sleep(600)"],
        {},
        result_fd=None,
        tar_size=0,
        stdin_size=0,
        timeout=600,
    )
    sock = attached.detach_socket()
    sock.sendall(job)
    await anyio.sleep(0.5)
    assert our_containers(docker_api, "exe_crash")  # running its job
    sock.shutdown(socket.SHUT_RDWR)
    sock.close()
    attached.close()
    assert await anyio.to_thread.run_sync(wait_gone, docker_api, "exe_crash") == []


async def test_orphans_are_reaped_at_start(docker_api: Any, tmp_path: Path) -> None:
    first = DockerBackend(docker_settings(tmp_path))
    await first.start()
    assert first._factory is not None
    profile = first.profile(first._settings.default_image, default_limits(first._settings))
    attached = await anyio.to_thread.run_sync(first._factory.create, profile, "exe_orphan")
    assert our_containers(docker_api, "exe_orphan")
    # "crash": the first backend is never closed; a new one starts on the same daemon
    second = DockerBackend(docker_settings(tmp_path))
    await second.start()
    try:
        assert await anyio.to_thread.run_sync(wait_gone, docker_api, "exe_orphan") == []
    finally:
        attached.close()
        await second.close()
        await first.close()


async def test_no_container_of_ours_is_left(docker_backend: DockerBackend, docker_api: Any) -> None:
    for code in ("print(1)", "raise SystemExit(2)", "import os; os.kill(os.getpid(), 9)"):
        await run(docker_backend, await make_spec(docker_backend, code))
    await docker_backend.close()
    assert await anyio.to_thread.run_sync(wait_gone, docker_api) == []
    assert INSTANCE.startswith("tests-")


async def test_describe_reports_enforcement(docker_backend: DockerBackend) -> None:
    info = docker_backend.describe()
    assert info["backend"] == "docker" and info["read_only_root"] is True
    assert info["default_image_present"] is True and info["cgroup_version"] in ("1", "2")


async def test_workspace_lifecycle(docker_backend: DockerBackend) -> None:
    path = await docker_backend.create_workspace("exe_ws", 10)
    assert path.is_dir() and path.parent == docker_backend._settings.runs_path
    (path / "f").write_text("x")
    await docker_backend.remove_workspace(path)
    await docker_backend.remove_workspace(path)  # idempotent
    assert not path.exists()
