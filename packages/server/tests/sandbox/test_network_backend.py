"""Network on and off through the real ``BwrapBackend`` (its own bwrap command line,
rootfs, cgroups and seccomp), against the test host of test_network.py."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from bwrap_harness import Harness, eventually
from python_executor_server.sandbox.base import CollectedOutput, Interpreter
from python_executor_server.sandbox.bwrap import BwrapBackend
from python_executor_server.settings import Settings
from test_network import TestHost, _slirp_pids, test_host

pytestmark = [pytest.mark.sandbox, pytest.mark.network]
__all__ = ["test_host"]  # the fixture, imported to be used here

CONNECT = """
import errno, socket, sys
try:
    with socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5) as s:
        s.sendall(b"ping")
        print("echo" if s.recv(4) == b"ping" else "connected")
except OSError as e:
    print(errno.errorcode.get(e.errno, str(e)))
print(open("/etc/resolv.conf").read().split()[-1] if len(sys.argv) > 3 else "")
"""


async def _harness(settings: Settings, interpreter: Interpreter) -> AsyncIterator[Harness]:
    backend = BwrapBackend(settings, {interpreter.version: interpreter})
    await backend.start()
    harness = Harness(backend, interpreter, settings)
    try:
        yield harness
    finally:
        for work in harness.workspaces:
            await backend.remove_workspace(work)
        await backend.close()


@pytest.fixture()
async def allowing(
    sandbox_settings: Settings, interpreter: Interpreter, test_host: TestHost
) -> AsyncIterator[Harness]:
    """A backend whose settings allow the test host's subnet."""
    settings = sandbox_settings.model_copy(update={"network_allow_cidrs": [test_host.subnet]})
    async for harness in _harness(settings, interpreter):
        yield harness


async def _connect(harness: Harness, host: TestHost, *, network: bool, resolv: bool = False) -> str:
    argv = (
        str(harness.interpreter.executable),
        "-I",
        "-c",
        CONNECT,
        host.address,
        str(host.port),
        *(["resolv"] if resolv else []),
    )
    work = await harness.workspace()
    output = CollectedOutput()
    outcome = await harness.backend.run(harness.spec(work, argv=argv, network=network), output)
    assert outcome.exit_code == 0, (outcome, output.text("stderr"))
    return output.text("stdout")


@pytest.mark.timeout(120)
async def test_backend_run_with_network_reaches_an_allowed_host(
    allowing: Harness, test_host: TestHost
) -> None:
    before = set(_slirp_pids())
    lines = (await _connect(allowing, test_host, network=True, resolv=True)).split("\n")
    assert lines[0] == "echo"
    assert lines[1] == "10.0.2.3"  # the sandbox resolves through slirp's DNS
    # Its NAT was let go with the run and exits on its own, right after (the answer
    # does not wait for that); the backend's close waits for any still exiting.
    ending = allowing.backend._ending
    assert await eventually(lambda: set(_slirp_pids()) <= before, within=5)
    assert await eventually(lambda: not ending, within=5)


@pytest.mark.timeout(120)
async def test_backend_run_with_network_is_firewalled_by_default(
    sandbox: Harness, test_host: TestHost
) -> None:
    out = await _connect(sandbox, test_host, network=True)
    assert out.split("\n")[0] == "EHOSTUNREACH"


@pytest.mark.timeout(120)
async def test_backend_run_without_network_reaches_nothing(
    allowing: Harness, test_host: TestHost
) -> None:
    out = await _connect(allowing, test_host, network=False)  # allowed, but network off
    seccomp = allowing.backend.describe()["seccomp"]
    assert out.split("\n")[0] == ("EAFNOSUPPORT" if seccomp else "ENETUNREACH")
