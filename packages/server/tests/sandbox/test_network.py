"""Network on and off for a real bwrap sandbox, against a test host the test creates.

The test host lives in a network namespace of its own, joined to the host by a
veth pair on a random 10.213.x.0/30 (10.0.0.0/8 is in the default deny list),
and runs a TCP echo server. Every sandbox here is bwrap as host uid 1000 with
``--unshare-all --dev`` (so bwrap makes nested user namespaces, as the
backend's does), the seccomp filter, and ``--block-fd`` so that the network is
attached before the program starts. Nothing is sent to an outside address.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import textwrap
import threading
import uuid
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import pytest
from python_executor_server.errors import SandboxError
from python_executor_server.sandbox import network
from python_executor_server.sandbox.network import (
    NetworkAttachment,
    attach_network,
    host_addresses,
    network_status,
)
from python_executor_server.sandbox.seccomp import compile_filter
from python_executor_server.settings import Settings

BWRAP = shutil.which("bwrap")
IP = shutil.which("ip") or "/usr/sbin/ip"
PYTHON = "/usr/bin/python3"

pytestmark = [pytest.mark.sandbox, pytest.mark.network]


@pytest.fixture(autouse=True, scope="module")
def _prerequisites() -> None:
    """Skip without root, bwrap or slirp4netns; in CI (``CI`` set) fail instead."""
    missing = [
        reason
        for reason, absent in (
            ("root (network namespaces, uid 1000)", os.geteuid() != 0),
            ("bubblewrap (bwrap)", BWRAP is None),
            ("slirp4netns", network._find("slirp4netns") is None),
        )
        if absent
    ]
    if missing:
        message = f"the network tests need {', '.join(missing)}"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)


# --- the test host --------------------------------------------------------------


@dataclass(frozen=True)
class TestHost:
    __test__ = False  # not a test class
    netns: str
    subnet: str  # the /30 of the veth pair
    address: str  # the test host's end
    port: int  # its TCP echo server


ECHO_SERVER = """
import socket, sys, threading
srv = socket.socket()
srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind((sys.argv[1], int(sys.argv[2])))
srv.listen(16)
print("listening", flush=True)
def echo(conn):
    with conn:
        while data := conn.recv(4096):
            conn.sendall(data)
while True:
    conn, _ = srv.accept()
    threading.Thread(target=echo, args=(conn,), daemon=True).start()
"""


def _ip(*args: str) -> None:
    done = subprocess.run([IP, *args], capture_output=True, text=True, timeout=10)
    assert done.returncode == 0, f"ip {' '.join(args)}: {done.stderr}"


@pytest.fixture
def test_host() -> Iterator[TestHost]:
    tag = uuid.uuid4().hex[:6]
    netns, outer, inner = f"pyx-th-{tag}", f"pyxh{tag}", f"pyxp{tag}"
    third = random.randrange(0, 256)
    subnet, host_end, far_end = (f"10.213.{third}.{n}" for n in (0, 1, 2))
    server: subprocess.Popen[str] | None = None
    try:
        _ip("netns", "add", netns)
        _ip("link", "add", outer, "type", "veth", "peer", "name", inner)
        _ip("link", "set", inner, "netns", netns)
        _ip("addr", "add", f"{host_end}/30", "dev", outer)
        _ip("link", "set", outer, "up")
        _ip("-n", netns, "addr", "add", f"{far_end}/30", "dev", inner)
        _ip("-n", netns, "link", "set", inner, "up")
        _ip("-n", netns, "link", "set", "lo", "up")
        server = subprocess.Popen(
            [IP, "netns", "exec", netns, sys.executable, "-c", ECHO_SERVER, far_end, "7007"],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert server.stdout is not None and server.stdout.readline() == "listening\n"
        yield TestHost(netns, f"{subnet}/30", far_end, 7007)
    finally:
        if server is not None:
            server.kill()
            server.wait()
            if server.stdout is not None:
                server.stdout.close()
        subprocess.run([IP, "link", "del", outer], capture_output=True, timeout=10)
        subprocess.run([IP, "netns", "del", netns], capture_output=True, timeout=10)


def test_host_is_reachable_from_the_host(test_host: TestHost) -> None:
    """Control for everything below: the route from the host to the test host works."""
    with socket.create_connection((test_host.address, test_host.port), timeout=5) as s:
        s.sendall(b"ping")
        assert s.recv(4) == b"ping"


# --- sandboxes --------------------------------------------------------------------

# Tries each "host:port" target from argv and prints {target: "echo" | "connected" | errno}.
CONNECT_PROGRAM = textwrap.dedent(
    """
    import errno, json, socket, sys
    out = {}
    for target in sys.argv[1:]:
        host, port = target.rsplit(":", 1)
        try:
            with socket.create_connection((host, int(port)), timeout=5) as s:
                s.sendall(b"ping")
                s.settimeout(5)
                out[target] = "echo" if s.recv(4) == b"ping" else "connected"
        except socket.timeout:
            out[target] = "timeout"
        except OSError as e:
            out[target] = errno.errorcode.get(e.errno, str(e))
    print(json.dumps(out))
    """
)


@dataclass
class SandboxRun:
    returncode: int
    stdout: str
    stderr: str
    attachment: NetworkAttachment | None

    def json(self) -> dict[str, Any]:
        assert self.returncode == 0, self.stderr
        result: dict[str, Any] = json.loads(self.stdout.strip().splitlines()[-1])
        return result


def _bwrap_argv(info_fd: int, block_fd: int, seccomp_fd: int | None) -> list[str]:
    argv = [BWRAP or "bwrap", "--unshare-all", "--die-with-parent", "--new-session"]
    argv += ["--ro-bind", "/usr", "/usr", "--ro-bind", "/etc/resolv.conf", "/etc/resolv.conf"]
    for link in ("lib", "lib64", "bin", "sbin"):
        argv += ["--symlink", f"usr/{link}", f"/{link}"]
    argv += ["--proc", "/proc", "--dev", "/dev", "--tmpfs", "/tmp"]
    argv += ["--info-fd", str(info_fd), "--block-fd", str(block_fd)]
    if seccomp_fd is not None:
        argv += ["--seccomp", str(seccomp_fd)]
    return argv


def _read_child_pid(fd: int) -> int:
    buf = b""
    while True:  # bwrap writes the info JSON before it blocks on --block-fd
        chunk = os.read(fd, 4096)
        if not chunk:
            raise AssertionError(f"bwrap closed --info-fd early: {buf!r}")
        buf += chunk
        with contextlib.suppress(ValueError):
            return int(json.loads(buf)["child-pid"])


async def run_sandbox(
    code: str,
    *args: str,
    settings: Settings | None,
    seccomp: bool = True,
    limit_seconds: float = 60,
    attach: Callable[[int, Settings], Awaitable[NetworkAttachment]] = attach_network,
) -> SandboxRun:
    """Run ``python3 -c code args`` as uid 1000; with ``settings``, attach the network first."""
    info_r, info_w = os.pipe()
    block_r, block_w = os.pipe()
    child_fds = [info_w, block_r]
    seccomp_fd = None
    if seccomp:
        seccomp_fd, w = os.pipe()
        os.write(w, compile_filter(allow_inet=settings is not None))
        os.close(w)
        child_fds.append(seccomp_fd)
    argv = [*_bwrap_argv(info_w, block_r, seccomp_fd), PYTHON, "-c", code, *args]
    attachment = None
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        proc = await anyio.open_process(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=err,
            pass_fds=child_fds,
            user=1000,
            group=1000,
            extra_groups=[],
        )
        for fd in child_fds:
            os.close(fd)
        try:
            with anyio.fail_after(limit_seconds):
                pid = await anyio.to_thread.run_sync(_read_child_pid, info_r)
                if settings is not None:
                    attachment = await attach(pid, settings)
                os.write(block_w, b"go")
                await proc.wait()
        finally:
            os.close(info_r)
            os.close(block_w)
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
            if attachment is not None:
                await attachment.close()
        out.seek(0)
        err.seek(0)
        return SandboxRun(
            proc.returncode or 0, out.read().decode(), err.read().decode(), attachment
        )


def _target(host: str, port: int) -> str:
    return f"{host}:{port}"


# --- network on ---------------------------------------------------------------------


@pytest.mark.timeout(90)
async def test_allowed_test_host_is_reachable(test_host: TestHost) -> None:
    target = _target(test_host.address, test_host.port)
    settings = Settings(network_allow_cidrs=[test_host.subnet])
    run = await run_sandbox(CONNECT_PROGRAM, target, settings=settings)
    assert run.json() == {target: "echo"}


@pytest.mark.timeout(120)
async def test_concurrent_sandboxes_each_get_their_own_network(test_host: TestHost) -> None:
    target = _target(test_host.address, test_host.port)
    allowed = Settings(network_allow_cidrs=[test_host.subnet])
    results: dict[int, SandboxRun] = {}

    async def one(i: int) -> None:
        results[i] = await run_sandbox(CONNECT_PROGRAM, target, settings=allowed)

    async with anyio.create_task_group() as tg:
        for i in range(4):
            tg.start_soon(one, i)
    assert [results[i].json() for i in range(4)] == [{target: "echo"}] * 4
    pids = {run.attachment.nat_pid for run in results.values() if run.attachment}
    assert len(pids) == 4  # one NAT per sandbox, all stopped by now
    assert not any(_alive(pid) for pid in pids)


@pytest.mark.timeout(90)
async def test_test_host_is_blocked_without_its_allow_entry(test_host: TestHost) -> None:
    target = _target(test_host.address, test_host.port)
    settings = Settings()  # 10.0.0.0/8 denied by default
    assert settings.network_allow_cidrs == []
    run = await run_sandbox(CONNECT_PROGRAM, target, settings=settings)
    assert run.json()[target] == "EHOSTUNREACH"  # rejected at once by the firewall


@pytest.mark.timeout(90)
@pytest.mark.parametrize(
    "tool",
    [
        t
        for t, binary in (("nftables", "nft"), ("iptables", "iptables-restore"))
        if network._find(binary)
    ],
)
async def test_each_firewall_tool_enforces_the_same_policy(
    tool: str, test_host: TestHost, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(network, "firewall_tool", lambda: tool)
    target = _target(test_host.address, test_host.port)
    allowed = await run_sandbox(
        CONNECT_PROGRAM, target, settings=Settings(network_allow_cidrs=[test_host.subnet])
    )
    denied = await run_sandbox(CONNECT_PROGRAM, target, settings=Settings())
    assert allowed.json() == {target: "echo"}
    assert denied.json()[target] == "EHOSTUNREACH"


class HostListener:
    """A TCP listener on the host that records whether anyone connected."""

    def __init__(self, address: str) -> None:
        self.sock = socket.socket(socket.AF_INET6 if ":" in address else socket.AF_INET)
        self.sock.bind((address, 0))
        self.sock.listen(8)
        self.sock.settimeout(0.2)
        self.port: int = self.sock.getsockname()[1]
        self.accepted = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            self.accepted += 1
            with conn:
                conn.sendall(b"ping")

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.sock.close()


@pytest.fixture
def loopback_listener() -> Iterator[HostListener]:
    listener = HostListener("127.0.0.1")
    yield listener
    listener.close()


@pytest.mark.timeout(90)
async def test_host_loopback_is_not_reachable_with_network_on(
    loopback_listener: HostListener,
) -> None:
    port = loopback_listener.port
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:  # control
        assert s.recv(4) == b"ping"
    before = loopback_listener.accepted
    targets = [_target("127.0.0.1", port), _target(network.SLIRP_GATEWAY, port)]
    got = (await run_sandbox(CONNECT_PROGRAM, *targets, settings=Settings())).json()
    assert got[targets[0]] == "ECONNREFUSED"  # the sandbox's own loopback: nobody there
    assert got[targets[1]] == "EHOSTUNREACH"  # the gateway is firewalled
    assert loopback_listener.accepted == before


@pytest.mark.timeout(90)
async def test_allow_list_cannot_open_slirps_own_addresses(
    loopback_listener: HostListener,
) -> None:
    """10.0.2.2 is the host's loopback and 10.0.2.3:<port> the host's resolver at that
    port, to slirp: only DNS on 10.0.2.3:53 passes, whatever the allow list says."""
    port = loopback_listener.port
    targets = [_target(network.SLIRP_GATEWAY, port), _target(network.SLIRP_DNS, port)]
    settings = Settings(network_allow_cidrs=["10.0.0.0/8", "127.0.0.0/8"])
    got = (await run_sandbox(CONNECT_PROGRAM, *targets, settings=settings)).json()
    assert got == {targets[0]: "EHOSTUNREACH", targets[1]: "EHOSTUNREACH"}
    assert loopback_listener.accepted == 0


@pytest.mark.timeout(90)
async def test_host_loopback_stays_closed_without_the_firewall(
    loopback_listener: HostListener, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Defence in depth: slirp4netns --disable-host-loopback holds on its own."""

    async def no_firewall(*args: object) -> None:
        return None

    monkeypatch.setattr(network, "_apply_firewall", no_firewall)
    target = _target(network.SLIRP_GATEWAY, loopback_listener.port)
    got = (await run_sandbox(CONNECT_PROGRAM, target, settings=Settings())).json()
    assert got[target] == "ENETUNREACH"  # slirp4netns refuses it itself
    assert loopback_listener.accepted == 0


def _host_public_address() -> str | None:
    for net in host_addresses():
        addr = net.network_address
        if net.version == 4 and not addr.is_loopback and not addr.is_private:
            return str(addr)
    for net in host_addresses():  # any non-loopback IPv4 the deny list does not cover
        addr = net.network_address
        if net.version == 4 and not addr.is_loopback:
            return str(addr)
    return None


@pytest.mark.timeout(90)
async def test_host_own_addresses_are_not_reachable() -> None:
    """NAT traffic leaves from the host, so the host's own addresses are denied too."""
    address = _host_public_address()
    if address is None:
        pytest.skip("the host has no non-loopback IPv4 address")
    listener = HostListener(address)
    try:
        target = _target(address, listener.port)
        blocked = (await run_sandbox(CONNECT_PROGRAM, target, settings=Settings())).json()
        assert blocked[target] == "EHOSTUNREACH"
        assert listener.accepted == 0
        # Control: the same listener through the same NAT, once explicitly allowed.
        settings = Settings(network_allow_cidrs=[f"{address}/32"])
        allowed = (await run_sandbox(CONNECT_PROGRAM, target, settings=settings)).json()
        assert allowed[target] == "echo"
        assert listener.accepted == 1
    finally:
        listener.close()


DNS_PROBE = textwrap.dedent(
    """
    import errno, json, socket, sys
    query = bytes.fromhex("abcd01000001000000000000076578616d706c6503636f6d0000010001")
    out = {}
    for server in sys.argv[1:]:
        try:
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            s.settimeout(4)
            s.connect((server, 53))
            s.send(query)
            reply = s.recv(512)
            out[server] = "reply" if reply[:2] == query[:2] else "garbage"
        except socket.timeout:
            out[server] = "timeout"
        except OSError as e:
            out[server] = errno.errorcode.get(e.errno, str(e))
    print(json.dumps(out))
    """
)


def _host_resolver_answers() -> bool:
    nameservers = [
        line.split()[1]
        for line in Path("/etc/resolv.conf").read_text().splitlines()
        if line.startswith("nameserver")
    ]
    query = bytes.fromhex("abcd01000001000000000000076578616d706c6503636f6d0000010001")
    for ns in nameservers:
        with socket.socket(
            socket.AF_INET6 if ":" in ns else socket.AF_INET, socket.SOCK_DGRAM
        ) as s:
            s.settimeout(3)
            with contextlib.suppress(OSError):
                s.sendto(query, (ns, 53))
                return s.recv(512)[:2] == query[:2]
    return False


@pytest.mark.timeout(90)
async def test_dns_to_slirp_passes_the_firewall() -> None:
    got = (await run_sandbox(DNS_PROBE, network.SLIRP_DNS, "10.0.2.4", settings=Settings())).json()
    assert got["10.0.2.4"] == "EPERM"  # the rest of 10.0.2.0/24 is denied (UDP: at send)
    if _host_resolver_answers():
        assert got[network.SLIRP_DNS] == "reply"  # forwarded to the host's resolver
    else:  # nothing upstream: still, the firewall let the query out
        assert got[network.SLIRP_DNS] in {"reply", "timeout"}


FLUSH_THEN_CONNECT = textwrap.dedent(
    """
    import json, subprocess
    def run(*argv):
        done = subprocess.run(argv, capture_output=True, text=True)
        return [done.returncode, done.stderr.strip()]
    print(json.dumps({
        "nft": run("/usr/sbin/nft", "flush", "ruleset"),
        "iptables": run("/usr/sbin/xtables-nft-multi", "iptables", "-F"),
    }))
    """
)


@pytest.mark.timeout(90)
async def test_sandbox_cannot_remove_its_firewall(test_host: TestHost) -> None:
    target = _target(test_host.address, test_host.port)
    code = FLUSH_THEN_CONNECT + CONNECT_PROGRAM
    run = await run_sandbox(code, target, settings=Settings())
    assert run.returncode == 0, run.stderr
    first, second = (json.loads(line) for line in run.stdout.strip().splitlines()[-2:])
    assert first["nft"][0] != 0, first
    assert "Operation not permitted" in first["nft"][1]
    assert second[target] == "EHOSTUNREACH"


# --- network off --------------------------------------------------------------------


@pytest.mark.timeout(90)
@pytest.mark.parametrize("seccomp", [True, False], ids=["with-seccomp", "namespace-only"])
async def test_network_off_reaches_nothing(
    seccomp: bool, test_host: TestHost, loopback_listener: HostListener
) -> None:
    targets = [
        _target(test_host.address, test_host.port),
        _target("127.0.0.1", loopback_listener.port),
        _target(network.SLIRP_GATEWAY, loopback_listener.port),
    ]
    got = (await run_sandbox(CONNECT_PROGRAM, *targets, settings=None, seccomp=seccomp)).json()
    if seccomp:  # no AF_INET socket at all
        assert set(got.values()) == {"EAFNOSUPPORT"}
    else:  # an empty namespace: only its own loopback, where nobody listens
        assert got[targets[0]] == "ENETUNREACH"
        assert got[targets[1]] == "ECONNREFUSED"
        assert got[targets[2]] == "ENETUNREACH"
    assert loopback_listener.accepted == 0


RESOLVE = textwrap.dedent(
    """
    import json, socket
    try:
        socket.getaddrinfo("example.com", 80)
        print(json.dumps({"resolved": True}))
    except OSError as e:
        print(json.dumps({"resolved": False, "error": str(e)}))
    """
)


@pytest.mark.timeout(90)
@pytest.mark.parametrize("seccomp", [True, False], ids=["with-seccomp", "namespace-only"])
async def test_network_off_has_no_dns(seccomp: bool) -> None:
    got = (await run_sandbox(RESOLVE, settings=None, seccomp=seccomp)).json()
    assert got["resolved"] is False
    dns = (await run_sandbox(DNS_PROBE, network.SLIRP_DNS, settings=None, seccomp=seccomp)).json()
    assert dns[network.SLIRP_DNS] == ("EAFNOSUPPORT" if seccomp else "ENETUNREACH")


# --- the attachment itself ------------------------------------------------------------


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"


@pytest.mark.timeout(90)
async def test_attach_is_fast_and_close_stops_the_nat() -> None:
    run = await run_sandbox("print('{}')", settings=Settings())
    attachment = run.attachment
    assert attachment is not None
    print(f"attach_network took {attachment.attach_seconds * 1000:.1f} ms")
    assert attachment.attach_seconds < 2.0
    assert not _alive(attachment.nat_pid)  # run_sandbox closed it
    await attachment.close()  # idempotent


@pytest.mark.timeout(90)
async def test_nat_has_no_host_privileges_and_exits_with_its_attachment() -> None:
    code = "import time; time.sleep(0.5); print('{}')"
    seen: dict[str, str] = {}

    async def watch() -> None:  # the last sample is from well after setup
        while True:
            await anyio.sleep(0.02)
            for pid in _slirp_pids():
                with contextlib.suppress(OSError):
                    seen.update(_proc_status(pid))

    async with anyio.create_task_group() as tg:
        tg.start_soon(watch)
        run = await run_sandbox(code, settings=Settings())
        tg.cancel_scope.cancel()
    assert run.returncode == 0, run.stderr
    uid = int(seen["Uid"].split()[0])
    expected_uid = 0 if network_status()["nat_runs_as"] == "root" else 1000
    assert uid == expected_uid
    # Whatever its uid: at most CAP_NET_BIND_SERVICE, no new privileges, its own
    # seccomp filter, and a mount namespace of its own (slirp4netns --enable-sandbox).
    assert seen["mntns"] != os.readlink("/proc/self/ns/mnt")
    assert int(seen["CapEff"], 16) & ~(1 << 10) == 0
    assert seen["NoNewPrivs"].strip() == "1"
    assert seen["Seccomp"].strip() == "2"
    assert not _alive(int(seen["pid"]))


def _proc_status(pid: int) -> dict[str, str]:
    status = Path(f"/proc/{pid}/status").read_text()
    fields = dict(line.split(":\t", 1) for line in status.splitlines() if ":\t" in line)
    return {**fields, "mntns": os.readlink(f"/proc/{pid}/ns/mnt"), "pid": str(pid)}


def _slirp_pids() -> list[int]:
    """slirp4netns processes started by this test process (not by anyone else's)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                stat = (entry / "stat").read_text()
                comm, rest = stat[stat.index("(") + 1 :].split(")", 1)
                if comm == "slirp4netns" and int(rest.split()[1]) == os.getpid():
                    pids.append(int(entry.name))
    return pids


@pytest.mark.timeout(90)
async def test_failed_attach_is_a_clear_error_and_leaves_no_nat() -> None:
    second: dict[str, object] = {}

    async def attach_twice(pid: int, settings: Settings) -> NetworkAttachment:
        first = await attach_network(pid, settings)
        before = set(_slirp_pids())
        try:
            await attach_network(pid, settings)  # tap0 exists: slirp4netns fails
        except SandboxError as exc:
            second["error"] = str(exc)
        second["leftover"] = set(_slirp_pids()) - before
        return first

    run = await run_sandbox("print('{}')", settings=Settings(), attach=attach_twice)
    assert run.returncode == 0, run.stderr
    assert "slirp4netns failed" in str(second["error"]), second
    assert "TUNSETIFF" in str(second["error"])  # its own message is passed on
    assert second["leftover"] == set()


@pytest.mark.timeout(90)
@pytest.mark.parametrize("nft_seconds", [0, 0.5])
async def test_a_firewall_that_fails_leaves_no_nat(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, nft_seconds: float
) -> None:
    # The firewall and the NAT start together: when the firewall fails (here an nft that
    # refuses, first on PATH), the NAT started beside it goes, still starting (0 s) or
    # ready (0.5 s), and the sandbox gets no network from that attach.
    fake = tmp_path / "nft"
    fake.write_text(f"#!/bin/sh\nsleep {nft_seconds}\necho 'refused by the test' >&2\nexit 1\n")
    fake.chmod(0o755)
    real_path = os.environ["PATH"]
    seen: dict[str, object] = {}

    async def attach_failing_then_real(pid: int, settings: Settings) -> NetworkAttachment:
        before = set(_slirp_pids())
        monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{real_path}")
        try:
            await attach_network(pid, settings)
        except SandboxError as exc:
            seen["error"] = str(exc)
        finally:
            monkeypatch.setenv("PATH", real_path)
        seen["leftover"] = set(_slirp_pids()) - before
        return await attach_network(pid, settings)  # (tap0 went with the first NAT)

    run = await run_sandbox("print('{}')", settings=Settings(), attach=attach_failing_then_real)
    assert run.returncode == 0, run.stderr
    assert "could not load the sandbox firewall" in str(seen["error"]), seen
    assert "refused by the test" in str(seen["error"])
    assert seen["leftover"] == set()


@pytest.mark.timeout(30)
async def test_refuses_the_servers_own_namespace() -> None:
    before = (await anyio.run_process(["nft", "list", "tables"])).stdout
    with pytest.raises(SandboxError, match="shares the server's network namespace"):
        await attach_network(os.getpid(), Settings())
    after = (await anyio.run_process(["nft", "list", "tables"])).stdout
    assert b"python_executor" not in after and before == after


@pytest.mark.timeout(30)
async def test_dead_pid_is_a_clear_error() -> None:
    proc = await anyio.open_process(["true"])
    await proc.wait()
    with pytest.raises(SandboxError, match=f"pid {proc.pid}"):
        await attach_network(proc.pid, Settings())


@pytest.mark.timeout(30)
async def test_bad_cidr_is_a_clear_error() -> None:
    with pytest.raises(SandboxError, match="network_allow_cidrs"):
        await attach_network(1, Settings(network_allow_cidrs=["10.0.0.300/8"]))


@pytest.mark.timeout(30)
def test_status_reports_nat_and_firewall() -> None:
    status = network_status()
    assert status["nat"] == "slirp4netns"
    assert status["firewall"] is True
    assert status["firewall_tool"] in {"nftables", "iptables"}
    assert status["available"] is True
