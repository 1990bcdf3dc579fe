"""Outbound network for one sandbox: user-mode NAT plus a firewall, never the host's namespace.

The sandbox already sits, blocked, in a fresh network namespace of its own
(bwrap ``--unshare-net --block-fd``). ``attach_network`` gives that namespace
a ``tap0`` device served by slirp4netns (10.0.2.0/24, gateway 10.0.2.2, DNS
10.0.2.3, host loopback disabled) and loads a firewall into it that rejects
traffic to ``settings.network_deny_cidrs`` and to every address of the host
itself, unless the destination is in ``settings.network_allow_cidrs``. The
sandbox's own loopback and DNS to 10.0.2.3 stay open.

Who runs what:

- slirp4netns parses untrusted packets. It runs as the owner of the user
  namespace that owns the sandbox's network namespace (the sandbox host uid),
  joining them to create ``tap0``, when that uid may open /dev/net/tun (the
  usual mode 0666); else as root. Either way it confines itself once set up
  (``--enable-sandbox --enable-seccomp``: private mount namespace, only
  CAP_NET_BIND_SERVICE left, no_new_privs, its own seccomp filter).
- the firewall is loaded by the server (root) through ``nsenter --net``. The
  sandboxed program cannot change it: it has no capabilities in that user
  namespace, and seccomp refuses unshare/setns.
- slirp's own subnet (10.0.2.0/24) is closed except DNS on 10.0.2.3:53 whatever
  the allow list says: slirp maps 10.0.2.2 to the host's loopback and
  10.0.2.3:<any port> to the host's resolver.
- the firewall and the NAT are set up at the same time (the rules name no device
  but ``lo``); the sandbox stays blocked until both are done, and a failed firewall
  takes the NAT started beside it down.

Usage::

    attachment = await attach_network(sandbox_pid, settings)
    try:
        ...                          # unblock the sandbox, wait for it
    finally:
        await attachment.close()
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import ipaddress
import itertools
import os
import shutil
import struct
import tempfile
import time
from collections.abc import Iterable, Sequence
from typing import IO, Literal

import anyio
import structlog
from anyio.abc import Process

from ..errors import SandboxError
from ..settings import Settings
from .base import SANDBOX_UID

log = structlog.get_logger("python_executor.sandbox.network")

TAP_DEVICE = "tap0"
SLIRP_SUBNET = "10.0.2.0/24"
SLIRP_GATEWAY = "10.0.2.2"
SLIRP_DNS = "10.0.2.3"
SLIRP_MTU = 65520
READY_TIMEOUT = 10.0
STOP_TIMEOUT = 2.0

_NS_GET_USERNS = 0xB701  # ioctl on a namespace fd: the owning user namespace
_NS_GET_OWNER_UID = 0xB704  # ioctl on a user namespace fd: its creator's uid
_SBIN = ("/usr/sbin", "/sbin", "/usr/bin", "/bin")

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
FirewallTool = Literal["nftables", "iptables"]


class NetworkAttachment:
    """A running NAT for one sandbox. ``close`` stops it; safe to call twice."""

    def __init__(self, nat: Process, exit_fd: int, log_file: IO[bytes], seconds: float) -> None:
        self._nat = nat
        self._exit_fd: int | None = exit_fd
        self._log_file = log_file
        self.attach_seconds = seconds  # how long attach_network took

    @property
    def nat_pid(self) -> int:
        return self._nat.pid

    def release(self) -> None:
        """Let slirp4netns go (``--exit-fd``: it exits when this closes), without waiting
        for it; ``close`` waits. Idempotent."""
        if self._exit_fd is not None:
            os.close(self._exit_fd)
            self._exit_fd = None

    async def close(self) -> None:
        """Release it and wait until it has exited (or kill it). Idempotent."""
        self.release()
        if self._log_file.closed:
            return
        with anyio.CancelScope(shield=True):
            await _stop(self._nat)
        self._log_file.close()


async def attach_network(pid: int, settings: Settings) -> NetworkAttachment:
    """Give the network namespace of ``pid`` filtered outbound access. See the module doc."""
    started = time.perf_counter()
    slirp = _find("slirp4netns")
    tool = firewall_tool()
    if slirp is None or tool is None:
        missing = "slirp4netns" if slirp is None else "nftables (or iptables)"
        raise SandboxError(f"network access needs {missing} installed on the server")
    allow = parse_cidrs(settings.network_allow_cidrs, "network_allow_cidrs")
    deny = parse_cidrs(settings.network_deny_cidrs, "network_deny_cidrs")
    deny += host_addresses()
    netns_fd, userns_fd, owner = _open_namespaces(pid)
    try:
        await _wait_for_loopback(pid)
        # Both at once: neither needs the other (the rules name no device but lo), and
        # the sandbox stays blocked until both are done.
        nat = asyncio.ensure_future(_start_nat(slirp, netns_fd, userns_fd, _nat_uid(owner)))
        try:
            await _apply_firewall(tool, netns_fd, userns_fd, allow, deny)
        except BaseException:
            await _discard(nat)
            raise
        attachment = await nat
    finally:
        os.close(netns_fd)
        os.close(userns_fd)
    attachment.attach_seconds = time.perf_counter() - started
    log.debug(
        "network attached",
        pid=pid,
        firewall=tool,
        nat_pid=attachment.nat_pid,
        ms=round(attachment.attach_seconds * 1000, 1),
    )
    return attachment


async def _discard(nat: asyncio.Future[NetworkAttachment]) -> None:
    """Stop a NAT started beside a firewall that failed (or was cancelled)."""
    nat.cancel()
    with anyio.CancelScope(shield=True):
        done = await asyncio.gather(nat, return_exceptions=True)
        if isinstance(done[0], NetworkAttachment):
            await done[0].close()


def network_status() -> dict[str, object]:
    """For /health: which NAT and firewall tools a run with network would get."""
    nat = "slirp4netns" if _find("slirp4netns") else None
    tool = firewall_tool()
    return {
        "available": nat is not None and tool is not None,
        "nat": nat,
        "nat_runs_as": "root" if _nat_uid(SANDBOX_UID) == 0 else "sandbox user",
        "firewall": tool is not None,
        "firewall_tool": tool,
    }


def firewall_tool() -> FirewallTool | None:
    if _find("nft"):
        return "nftables"
    if _find("iptables-restore"):
        return "iptables"
    return None


# --- addresses --------------------------------------------------------------------


def parse_cidrs(values: Iterable[str], setting: str) -> list[Network]:
    try:
        return [ipaddress.ip_network(v.strip(), strict=False) for v in values]
    except ValueError as exc:
        raise SandboxError(f"{setting}: {exc}") from exc


def host_addresses() -> list[Network]:
    """Every address the host answers on: NAT traffic leaves from the host, so a
    sandbox could otherwise reach host services bound to 0.0.0.0 through them."""
    found: set[Network] = set()
    try:
        with open("/proc/net/fib_trie", encoding="ascii") as f:
            lines = f.read().splitlines()
    except OSError:
        lines = []
    for prev, line in itertools.pairwise(lines):
        if line.strip() == "/32 host LOCAL" and "|--" in prev:
            found.add(ipaddress.ip_network(prev.split("|--")[1].strip()))
    try:
        with open("/proc/net/if_inet6", encoding="ascii") as f:
            for row in f:
                found.add(ipaddress.IPv6Network(int(row.split()[0], 16)))
    except (OSError, ValueError, IndexError):
        pass
    return sorted(found, key=lambda n: (n.version, n))


def _collapse(networks: Iterable[Network], version: int) -> list[str]:
    same = [n for n in networks if n.version == version]
    return [str(n) for n in ipaddress.collapse_addresses(same)]  # type: ignore[type-var]


# --- firewall ---------------------------------------------------------------------


def nft_ruleset(allow: Sequence[Network], deny: Sequence[Network]) -> str:
    """The nftables program loaded into the sandbox's namespace."""
    sets, rules = [], []
    for v, family, kind in ((4, "ip", "ipv4_addr"), (6, "ip6", "ipv6_addr")):
        for name, nets in (("allow", allow), ("deny", deny)):
            items = _collapse(nets, v)
            if items:
                elements = f" elements = {{ {', '.join(items)} }};"
                sets.append(f"  set {name}{v} {{ type {kind}; flags interval;{elements} }}")
                verdict = "accept" if name == "allow" else "reject with icmpx admin-prohibited"
                rules.append((name, f"    {family} daddr @{name}{v} {verdict}"))
    ordered = [r for n, r in rules if n == "allow"] + [r for n, r in rules if n == "deny"]
    return "\n".join(
        [
            "table inet python_executor {",
            *sets,
            "  chain output {",
            "    type filter hook output priority filter; policy accept;",
            '    oifname "lo" accept',
            f"    ip daddr {SLIRP_DNS} meta l4proto {{ tcp, udp }} th dport 53 accept",
            f"    ip daddr {SLIRP_SUBNET} reject with icmpx admin-prohibited",
            *ordered,
            "  }",
            "}",
            "",
        ]
    )


def iptables_rules(allow: Sequence[Network], deny: Sequence[Network], version: int) -> str:
    """The iptables-restore (4) or ip6tables-restore (6) input for the same policy."""
    reject = "icmp-admin-prohibited" if version == 4 else "icmp6-adm-prohibited"
    lines = ["*filter", ":OUTPUT ACCEPT [0:0]", "-A OUTPUT -o lo -j ACCEPT"]
    if version == 4:
        dns = f"-A OUTPUT -d {SLIRP_DNS}/32 --dport 53 -j ACCEPT"
        lines += [dns.replace("--dport", f"-p {p} --dport") for p in ("udp", "tcp")]
        lines += [f"-A OUTPUT -d {SLIRP_SUBNET} -j REJECT --reject-with {reject}"]
    lines += [f"-A OUTPUT -d {n} -j ACCEPT" for n in _collapse(allow, version)]
    lines += [
        f"-A OUTPUT -d {n} -j REJECT --reject-with {reject}" for n in _collapse(deny, version)
    ]
    return "\n".join([*lines, "COMMIT", ""])


async def _apply_firewall(
    tool: FirewallTool,
    netns_fd: int,
    userns_fd: int,
    allow: Sequence[Network],
    deny: Sequence[Network],
) -> None:
    if tool == "nftables":
        jobs = [([_find("nft") or "nft", "-f", "-"], nft_ruleset(allow, deny))]
    else:
        jobs = [([_find("iptables-restore") or "iptables-restore"], iptables_rules(allow, deny, 4))]
        if any(n.version == 6 for n in [*allow, *deny]) and _find("ip6tables-restore"):
            six = iptables_rules(allow, deny, 6)
            jobs.append(([_find("ip6tables-restore") or "ip6tables-restore"], six))
    for command, rules in jobs:
        argv = [_find("nsenter") or "nsenter", *_nsenter_args(netns_fd, userns_fd), *command]
        # The rules from a file, not a pipe: a tool that fails without reading them all
        # is then judged by its exit status and its words, not by a broken pipe.
        with tempfile.TemporaryFile() as rules_file:
            rules_file.write(rules.encode())
            rules_file.seek(0)
            result = await anyio.run_process(
                argv, stdin=rules_file, check=False, pass_fds=(netns_fd, userns_fd)
            )
        if result.returncode != 0:
            detail = result.stderr.decode(errors="replace").strip()
            raise SandboxError(f"could not load the sandbox firewall ({tool}): {detail}")


def _nsenter_args(netns_fd: int, userns_fd: int) -> list[str]:
    net = f"--net=/proc/self/fd/{netns_fd}"
    if os.geteuid() == 0:
        return [net]
    # Not root: act through the owning user namespace (works when we created it).
    return [f"--user=/proc/self/fd/{userns_fd}", "--preserve-credentials", net]


# --- namespaces and NAT -------------------------------------------------------------


def _open_namespaces(pid: int) -> tuple[int, int, int]:
    """fds of the network namespace of ``pid`` and of the user namespace owning it,
    and that user namespace's owner uid. Refuses the server's own namespace."""
    try:
        netns_fd = os.open(f"/proc/{pid}/ns/net", os.O_RDONLY)
    except OSError as exc:
        raise SandboxError(f"cannot open the network namespace of pid {pid}: {exc}") from exc
    try:
        if os.fstat(netns_fd).st_ino == os.stat("/proc/self/ns/net").st_ino:
            raise SandboxError(
                f"pid {pid} shares the server's network namespace (bwrap without --unshare-net?)"
            )
        userns_fd = fcntl.ioctl(netns_fd, _NS_GET_USERNS)
    except OSError as exc:
        os.close(netns_fd)
        raise SandboxError(f"cannot inspect the namespaces of pid {pid}: {exc}") from exc
    except SandboxError:
        os.close(netns_fd)
        raise
    try:
        raw = fcntl.ioctl(userns_fd, _NS_GET_OWNER_UID, b"\0" * 4)
    except OSError as exc:
        os.close(netns_fd)
        os.close(userns_fd)
        raise SandboxError(f"cannot inspect the namespaces of pid {pid}: {exc}") from exc
    return netns_fd, userns_fd, struct.unpack("=I", raw)[0]


async def _wait_for_loopback(pid: int) -> None:
    """bwrap reports the sandbox pid before it has configured ``lo``; touching the
    namespace meanwhile makes bwrap's netlink setup fail ("loopback: Failed
    RTM_NEWADDR"). ``lo`` is done when its broadcast route exists (added once up)."""
    with anyio.move_on_after(READY_TIMEOUT):
        while not _loopback_up(pid):  # noqa: ASYNC110  (nothing to wait on but procfs)
            await anyio.sleep(0.0005)
        return
    raise SandboxError(f"the network namespace of pid {pid} never brought up loopback")


def _loopback_up(pid: int) -> bool:
    try:  # procfs: answers at once
        with open(f"/proc/{pid}/net/fib_trie", encoding="ascii") as f:
            return "127.255.255.255" in f.read()
    except OSError as exc:
        raise SandboxError(f"sandbox pid {pid} is gone: {exc}") from exc


def _nat_uid(owner: int) -> int | None:
    """Who runs slirp4netns: the namespace owner if it may open /dev/net/tun (the
    usual 0666), else root. Either way slirp4netns confines itself once set up
    (--enable-sandbox: private mount namespace on an empty tmpfs, capabilities
    dropped to CAP_NET_BIND_SERVICE, no_new_privs; --enable-seccomp)."""
    if os.geteuid() != 0:
        return None  # as ourselves
    try:
        tun = os.stat("/dev/net/tun")
    except OSError:
        return owner
    may_open = tun.st_mode & 0o006 == 0o006 or (tun.st_uid == owner and tun.st_mode & 0o600)
    return owner if may_open else 0


async def _start_nat(
    slirp: str, netns_fd: int, userns_fd: int, uid: int | None
) -> NetworkAttachment:
    ready_r, ready_w = os.pipe()
    exit_r, exit_w = os.pipe()
    log_file = tempfile.TemporaryFile()  # noqa: SIM115  (lives as long as the NAT)
    argv = [
        slirp,
        "--configure",
        f"--mtu={SLIRP_MTU}",
        "--disable-host-loopback",
        "--enable-sandbox",
        "--enable-seccomp",
        f"--ready-fd={ready_w}",
        f"--exit-fd={exit_r}",
        f"--userns-path=/proc/self/fd/{userns_fd}",
        "--netns-type=path",
        f"/proc/self/fd/{netns_fd}",
        TAP_DEVICE,
    ]
    drop = uid is not None and uid != 0
    try:
        nat = await anyio.open_process(
            argv,
            stdin=None,
            stdout=log_file,
            stderr=log_file,
            pass_fds=(ready_w, exit_r, netns_fd, userns_fd),
            user=uid if drop else None,
            group=uid if drop else None,
            extra_groups=[] if drop else None,
        )
    except BaseException as exc:  # cancelled too (a run killed, or a pooled start dropped)
        for fd in (ready_r, ready_w, exit_r, exit_w):
            os.close(fd)
        log_file.close()
        if isinstance(exc, OSError):
            raise SandboxError(f"could not start slirp4netns: {exc}") from exc
        raise
    os.close(ready_w)
    os.close(exit_r)
    attachment = NetworkAttachment(nat, exit_w, log_file, 0.0)
    try:
        await _wait_ready(ready_r, nat, log_file)
    except BaseException:
        await attachment.close()
        raise
    finally:
        os.close(ready_r)
    return attachment


async def _wait_ready(ready_fd: int, nat: Process, log_file: IO[bytes]) -> None:
    with anyio.move_on_after(READY_TIMEOUT):
        await anyio.wait_readable(ready_fd)
        if os.read(ready_fd, 1) == b"1":
            return
        await _stop(nat)
        log_file.seek(0)
        lines = log_file.read()[-4000:].decode(errors="replace").splitlines()
        detail = "; ".join(line for line in lines if line and "seccomp is experimental" not in line)
        raise SandboxError(f"slirp4netns failed (exit {nat.returncode}): {detail}")
    raise SandboxError(f"slirp4netns did not configure {TAP_DEVICE} within {READY_TIMEOUT}s")


async def _stop(nat: Process) -> None:
    with anyio.move_on_after(STOP_TIMEOUT):
        await nat.wait()
        return
    with contextlib.suppress(ProcessLookupError):
        nat.kill()
    await nat.wait()


def _find(name: str) -> str | None:
    return shutil.which(name) or shutil.which(name, path=os.pathsep.join(_SBIN))
