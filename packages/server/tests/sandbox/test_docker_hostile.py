"""Hostile programs in Docker sandbox containers, each observed being stopped.

Every test asserts the effect (ENOSPC, EROFS, killed, refused) and, through
the fixture's teardown and ``wait_gone``, that no container of the run is left.
"""

from __future__ import annotations

import ipaddress
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import anyio
import pytest
from docker_support import make_spec, run, wait_gone
from python_executor_server.sandbox.base import CollectedOutput
from python_executor_server.sandbox.docker import DockerBackend

pytest_plugins = ["conftest_docker"]
pytestmark = [pytest.mark.docker, pytest.mark.timeout(120)]


async def test_root_filesystem_is_read_only(docker_backend: DockerBackend) -> None:
    code = (
        "import errno\n"
        "for path in ('/usr/evil', '/etc/evil', '/evil'):\n"
        "    try:\n"
        "        open(path, 'w')\n"
        "        print('WROTE', path)\n"
        "    except OSError as e:\n"
        "        print(errno.errorcode[e.errno])\n"
        "root = [l.split() for l in open('/proc/mounts') if l.split()[1] == '/'][-1]\n"
        "print(root[3].split(',')[0])\n"
    )
    _outcome, out = await run(docker_backend, await make_spec(docker_backend, code))
    lines = out.text("stdout").split()
    assert "WROTE" not in out.text("stdout")
    assert set(lines[:3]) <= {"EROFS", "EACCES"} and lines[3] == "ro", out.text("stdout")


@pytest.mark.parametrize("where", ["/work", "/tmp"])
async def test_disk_cap_gives_enospc(docker_backend: DockerBackend, where: str) -> None:
    code = (
        "import errno\n"
        "written = 0\n"
        "try:\n"
        f"    with open('{where}/fill', 'wb') as f:\n"
        "        while written < 64 << 20:\n"
        "            f.write(b'x' * (1 << 20)); f.flush(); written += 1 << 20\n"
        "    print('NO LIMIT')\n"
        "except OSError as e:\n"
        "    print(errno.errorcode[e.errno], written >> 20)\n"
    )
    spec = await make_spec(docker_backend, code, disk_mb=8, memory_mb=256)
    _outcome, out = await run(docker_backend, spec)
    code_name, mib = out.text("stdout").split()
    assert code_name == "ENOSPC" and int(mib) <= 8, out.text("stdout") + out.text("stderr")


async def test_memory_bomb_is_oom_killed(docker_backend: DockerBackend, docker_api: Any) -> None:
    code = "print('start', flush=True)\nhog = []\nwhile True:\n    hog.append(bytearray(8 << 20))\n"
    spec = await make_spec(docker_backend, code, memory_mb=64)
    outcome, out = await run(docker_backend, spec)
    assert outcome.oom_killed and outcome.exit_code == 137, (outcome, out.text("stderr"))
    assert out.text("stdout") == "start\n"  # partial output kept
    assert wait_gone(docker_api, spec.execution_id) == []


async def test_memory_in_tmpfs_counts_too(docker_backend: DockerBackend) -> None:
    code = "f = open('/tmp/big', 'wb')\nwhile True:\n    f.write(b'x' * (1 << 20)); f.flush()\n"
    spec = await make_spec(docker_backend, code, memory_mb=64, disk_mb=512)
    outcome, _ = await run(docker_backend, spec)
    assert outcome.oom_killed and outcome.exit_code == 137, outcome


async def test_pids_limit_stops_forking(docker_backend: DockerBackend) -> None:
    code = (
        "import os, time\n"
        "n = 0\n"
        "try:\n"
        "    while n < 1000:\n"
        "        if os.fork() == 0:\n"
        "            time.sleep(60); os._exit(0)\n"
        "        n += 1\n"
        "except OSError as e:\n"
        "    print('refused after', n, e.strerror)\n"
    )
    outcome, out = await run(docker_backend, await make_spec(docker_backend, code, pids=32))
    words = out.text("stdout").split()
    assert words[:2] == ["refused", "after"] and int(words[2]) < 32, out.text("stdout")
    assert outcome.exit_code == 0  # the sleeping children were killed when main exited


async def test_fork_bomb_ends_with_the_timeout(docker_backend: DockerBackend) -> None:
    code = (
        "import os\nprint('boom', flush=True)\n"
        "while True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n"
    )
    spec = await make_spec(docker_backend, code, pids=64, timeout_seconds=3)
    started = time.monotonic()
    outcome, out = await run(docker_backend, spec)
    assert outcome.timed_out and time.monotonic() - started < 15
    outcome, out = await run(docker_backend, await make_spec(docker_backend, "print('fine')"))
    assert out.text("stdout") == "fine\n"  # the daemon and the backend are unharmed


async def test_timeout_kills_and_keeps_partial_output(
    docker_backend: DockerBackend, docker_api: Any
) -> None:
    code = "import time\nprint('before', flush=True)\ntime.sleep(60)\nprint('after')\n"
    spec = await make_spec(docker_backend, code, timeout_seconds=2)
    started = time.monotonic()
    outcome, out = await run(docker_backend, spec)
    assert outcome.timed_out and outcome.exit_code is None
    assert out.text("stdout") == "before\n"
    assert time.monotonic() - started < 10
    assert wait_gone(docker_api, spec.execution_id, timeout=2) == []


async def test_cancellation_kills_within_a_second(
    docker_backend: DockerBackend, docker_api: Any
) -> None:
    code = "import time\nprint('started', flush=True)\ntime.sleep(120)\n"
    spec = await make_spec(docker_backend, code)
    sink = CollectedOutput()
    cancelled_at: list[float] = []
    async with anyio.create_task_group() as tg:

        async def runner() -> None:
            await docker_backend.run(spec, sink)

        tg.start_soon(runner)
        with anyio.fail_after(30):
            for _ in range(1500):
                if b"started" in sink.chunks["stdout"]:
                    break
                await anyio.sleep(0.02)
        assert [c["Id"] for c in our_running(docker_api, spec.execution_id)]
        cancelled_at.append(time.monotonic())
        tg.cancel_scope.cancel()
    assert time.monotonic() - cancelled_at[0] < 1.0
    assert our_running(docker_api, spec.execution_id) == []  # killed and removed already


def our_running(api: Any, execution_id: str) -> list[dict[str, Any]]:
    return list(
        api.containers(all=True, filters={"label": f"python-executor.execution={execution_id}"})
    )


async def test_daemonised_grandchild_does_not_outlive_the_run(
    docker_backend: DockerBackend,
) -> None:
    code = (
        "import os, time\n"
        "if os.fork() == 0:\n"
        "    os.setsid()\n"
        "    if os.fork() == 0:\n"
        "        time.sleep(120)\n"
        "    os._exit(0)\n"
        "print('parent done')\n"
    )
    started = time.monotonic()
    outcome, _out = await run(
        docker_backend, await make_spec(docker_backend, code, timeout_seconds=60)
    )
    assert outcome.exit_code == 0 and not outcome.timed_out
    assert time.monotonic() - started < 20


async def test_output_flood_is_drained(docker_backend: DockerBackend) -> None:
    code = (
        "import sys\nchunk = b'y' * (1 << 20)\n"
        "for _ in range(64):\n    sys.stdout.buffer.write(chunk)\n"
        "print('done', file=sys.stderr)\n"
    )
    outcome, out = await run(docker_backend, await make_spec(docker_backend, code), cap=1 << 20)
    assert outcome.exit_code == 0 and len(out.chunks["stdout"]) == 1 << 20
    assert out.text("stderr") == "done\n"


@pytest.fixture()
def bridge_listener(docker_api: Any) -> Iterator[tuple[str, int, list[bytes]]]:
    """A TCP listener on this host's own Docker bridge address (never an outside one)."""
    ipam = docker_api.inspect_network("bridge")["IPAM"]["Config"][0]
    gateway = ipam.get("Gateway") or str(ipaddress.ip_network(ipam["Subnet"])[1])
    server = socket.socket()
    server.bind((gateway, 0))
    server.listen()
    server.settimeout(0.2)
    seen: list[bytes] = []
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except OSError:
                continue
            with conn:
                conn.sendall(b"hello from the host")
                seen.append(b"connection")

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield gateway, server.getsockname()[1], seen
    stop.set()
    thread.join()
    server.close()


PROBE = (
    "import socket, sys\n"
    "try:\n"
    "    s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=3)\n"
    "    print(s.recv(100).decode())\n"
    "except OSError as e:\n"
    "    print('refused', type(e).__name__)\n"
)


@pytest.mark.parametrize("network", [False, True])
async def test_network(
    docker_backend: DockerBackend, bridge_listener: tuple[str, int, list[bytes]], network: bool
) -> None:
    host, port, seen = bridge_listener
    argv = ("/usr/bin/python3", "main.py", host, str(port))
    spec = await make_spec(docker_backend, PROBE, argv=argv, network=network)
    _outcome, out = await run(docker_backend, spec)
    if network:  # the control: the same probe reaches the listener when network is on
        assert out.text("stdout") == "hello from the host\n" and seen
    else:
        assert out.text("stdout").startswith("refused") and not seen, out.text("stdout")
