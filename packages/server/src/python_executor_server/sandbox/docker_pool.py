"""Docker sandbox containers: how one is made, and a warm pool of them.

Every container, warm or cold, is made the same way: created with the run's
limits, attached (stdin/stdout/stderr) *before* it starts, then started; its
pid 1 is the waiter (``docker_waiter.py``), blocked reading its one job. A
warm container is simply one made before the request arrived. Containers are
single-use and auto-removed by the daemon when they exit; one whose attach
connection drops (server crash) sees EOF and exits, so it removes itself too.

The pool is keyed by ``Profile`` (image, network and every limit fixed at
creation: memory, tmpfs size, pids, ...). Its threads do the blocking
docker-py work; ``take`` never waits: an empty pool means a cold start.

Usage::

    pool = WarmPool(factory, size=2)
    pool.warm(profile)                 # fill in the background
    attached = pool.take(profile)      # None: make one cold
    pool.close()                       # blocking: remove idle containers
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import threading
from collections import OrderedDict, deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from ..settings import Settings
from .base import SANDBOX_GID, SANDBOX_TMPDIR, SANDBOX_UID, SANDBOX_WORKDIR, Limits, Mount
from .docker_protocol import waiter_command

log = logging.getLogger(__name__)

LABEL = "python-executor"
LABEL_EXECUTION = "python-executor.execution"
LABEL_INSTANCE = "python-executor.instance"
START_ATTEMPTS = 3
MAX_PROFILES = 4  # profiles kept warm at once; the least recently used one is dropped


@dataclass(frozen=True)
class Profile:
    """Everything fixed when a container is created: the warm pool's key."""

    image: str
    network: str  # "none" or the Docker network for runs that asked for network
    memory_mb: int
    disk_mb: int
    cpu_shares: int
    pids: int
    open_files: int
    file_size_mb: int | None
    mounts: tuple[Mount, ...] = ()

    @classmethod
    def of(
        cls, image: str, limits: Limits, settings: Settings, mounts: tuple[Mount, ...] = ()
    ) -> Profile:
        return cls(
            image=image,
            network=settings.docker_network if limits.network else "none",
            memory_mb=limits.memory_mb,
            disk_mb=limits.disk_mb,
            cpu_shares=limits.cpu_shares,
            pids=limits.pids,
            open_files=limits.open_files,
            file_size_mb=limits.file_size_mb,
            mounts=mounts,
        )


def host_config(profile: Profile) -> dict[str, Any]:
    """Arguments for docker-py's ``create_host_config``: the enforcement, in one place."""
    inodes = max(4096, profile.disk_mb * 64)
    owner = f"uid={SANDBOX_UID},gid={SANDBOX_GID}"
    tmpfs = f"rw,nosuid,nodev,size={profile.disk_mb}m,nr_inodes={inodes},{owner}"
    ulimits = [
        {"name": "nofile", "soft": profile.open_files, "hard": profile.open_files},
        {"name": "core", "soft": 0, "hard": 0},
    ]
    if profile.file_size_mb is not None:
        size = profile.file_size_mb * 2**20
        ulimits.append({"name": "fsize", "soft": size, "hard": size})
    return {
        "read_only": True,
        "tmpfs": {SANDBOX_WORKDIR: f"{tmpfs},mode=0700", SANDBOX_TMPDIR: f"{tmpfs},mode=1777"},
        "cap_drop": ["ALL"],
        "security_opt": ["no-new-privileges"],
        "mem_limit": f"{profile.memory_mb}m",
        "memswap_limit": f"{profile.memory_mb}m",
        "pids_limit": profile.pids,
        "cpu_shares": profile.cpu_shares,
        "network_mode": profile.network,
        "ipc_mode": "private",
        "shm_size": f"{min(64, profile.disk_mb)}m",
        "ulimits": ulimits,
        "log_config": {"type": "none", "config": {}},
        "auto_remove": True,
        "binds": {
            str(m.source): {"bind": m.target, "mode": "rw" if m.writable else "ro"}
            for m in profile.mounts
        },
    }


def labels(settings: Settings, execution_id: str) -> dict[str, str]:
    return {LABEL: "1", LABEL_EXECUTION: execution_id, LABEL_INSTANCE: settings.docker_instance}


@dataclass
class Attached:
    """A started container whose waiter is blocked on our attach socket."""

    container_id: str
    sock: socket.socket | None  # ours (a dup), blocking until the run wraps it
    origin: Any = field(repr=False)  # docker-py's socket object: kept alive, closed with us

    def alive(self) -> bool:
        """The waiter writes nothing before its job: EOF or data means it is gone."""
        if self.sock is None:
            return False
        try:
            self.sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
        except BlockingIOError:
            return True
        except OSError:
            return False
        return False

    def detach_socket(self) -> socket.socket:
        sock, self.sock = self.sock, None
        assert sock is not None
        return sock

    def close(self) -> None:
        # SocketIO.close() forgets its socket: take it first, then close all three.
        for obj in (self.sock, getattr(self.origin, "_sock", None), self.origin):
            try:
                if obj is not None:
                    obj.close()
            except OSError:
                pass
        self.sock = None


class ContainerFactory:
    """Creates, attaches, starts and destroys sandbox containers (blocking calls)."""

    def __init__(self, api: Any, settings: Settings) -> None:
        self.api = api
        self.settings = settings

    def create(self, profile: Profile, execution_id: str = "") -> Attached:
        for attempt in range(START_ATTEMPTS):
            try:
                return self._create(profile, execution_id)
            except Exception as exc:
                # runc sometimes fails a start transiently on a busy host
                # ("OCI runtime create failed ... permission denied"): try again.
                if "OCI runtime" not in str(exc) or attempt == START_ATTEMPTS - 1:
                    raise
                log.warning("container start failed, retrying: %s", exc)
        raise AssertionError("unreachable")

    def _create(self, profile: Profile, execution_id: str) -> Attached:
        api = self.api
        created = api.create_container(
            profile.image,
            command=waiter_command(),
            user=f"{SANDBOX_UID}:{SANDBOX_GID}",
            stdin_open=True,  # with attach: StdinOnce, EOF when we disconnect
            working_dir=SANDBOX_WORKDIR,
            hostname="sandbox",
            labels=labels(self.settings, execution_id),
            host_config=api.create_host_config(**host_config(profile)),
        )
        cid = created["Id"]
        attached: Attached | None = None
        try:
            attached = self._attach(cid)
            api.start(cid)
        except BaseException:
            if attached is not None:
                attached.close()
            self.destroy(cid)
            raise
        return attached

    def _attach(self, cid: str) -> Attached:
        params = {"stdin": 1, "stdout": 1, "stderr": 1, "stream": 1}
        origin = self.api.attach_socket(cid, params=params)
        raw = getattr(origin, "_sock", origin)
        if not isinstance(raw, socket.socket) or raw.family not in (
            socket.AF_UNIX,
            socket.AF_INET,
            socket.AF_INET6,
        ):
            origin.close()
            raise OSError(
                errno.EPROTONOSUPPORT, "docker_socket must be unix:// or tcp:// without TLS"
            )
        # Our own descriptor: docker-py's objects may close theirs whenever they like.
        return Attached(cid, socket.socket(fileno=os.dup(raw.fileno())), origin)

    def destroy(self, cid: str) -> None:
        try:
            self.api.remove_container(cid, force=True)
        except Exception as exc:  # gone already, or auto-removal in progress
            if getattr(exc, "status_code", None) not in (404, 409):
                log.warning("could not remove container %s: %s", cid[:12], exc)

    def reap(self) -> int:
        """Remove every container of our instance: orphans of an earlier crash."""
        wanted = [f"{LABEL}=1", f"{LABEL_INSTANCE}={self.settings.docker_instance}"]
        found = self.api.containers(all=True, filters={"label": wanted})
        for c in found:
            self.destroy(c["Id"])
        return len(found)


class WarmPool:
    """Single-use started containers per profile, refilled by background threads."""

    def __init__(self, factory: ContainerFactory, size: int) -> None:
        self._factory = factory
        self._size = size
        self._lock = threading.Lock()
        self._idle: OrderedDict[Profile, deque[Attached]] = OrderedDict()
        self._filling: set[Profile] = set()
        self._errors: dict[Profile, str] = {}
        self._closed = False
        self._executor = ThreadPoolExecutor(max_workers=2, thread_name_prefix="docker-pool")

    def warm(self, profile: Profile) -> None:
        """Keep ``profile`` warm from now on (dropping the least recently used one)."""
        if self._size <= 0:
            return
        evicted: list[Attached] = []
        with self._lock:
            if self._closed:
                return
            self._idle.setdefault(profile, deque())
            self._idle.move_to_end(profile)
            while len(self._idle) > MAX_PROFILES:
                evicted += self._idle.popitem(last=False)[1]
            self._schedule(profile)
        for attached in evicted:
            self._executor.submit(self._discard, attached)

    def take(self, profile: Profile) -> Attached | None:
        """A warm container for ``profile`` or None; never waits."""
        while True:
            with self._lock:
                idle = self._idle.get(profile)
                attached = idle.popleft() if idle else None
            if attached is None or attached.alive():
                return attached
            self._executor.submit(self._discard, attached)

    def refill(self, profile: Profile) -> None:
        """Top ``profile`` up again; called when a run ends, so that making the
        next container does not compete for the CPU with the run itself."""
        with self._lock:
            if not self._closed and profile in self._idle:
                self._schedule(profile)

    def ready(self, profile: Profile) -> int:
        with self._lock:
            return len(self._idle.get(profile, ()))

    def status(self) -> dict[str, Any]:
        with self._lock:
            return {
                f"{p.image} network={p.network} memory={p.memory_mb}m disk={p.disk_mb}m": {
                    "ready": len(q),
                    **({"error": self._errors[p]} if p in self._errors else {}),
                }
                for p, q in self._idle.items()
            }

    def close(self) -> None:
        """Blocking: stop refilling and remove every idle container."""
        with self._lock:
            self._closed = True
            idle = [a for q in self._idle.values() for a in q]
            self._idle.clear()
        self._executor.shutdown(wait=True, cancel_futures=True)
        for attached in idle:
            self._discard(attached)

    def _schedule(self, profile: Profile) -> None:  # holding the lock
        if profile not in self._filling and len(self._idle[profile]) < self._size:
            self._filling.add(profile)
            self._executor.submit(self._fill, profile)

    def _fill(self, profile: Profile) -> None:
        try:
            while self._wants(profile):
                attached = self._factory.create(profile)
                with self._lock:
                    keep = not self._closed and profile in self._idle
                    if keep:
                        self._idle[profile].append(attached)
                        self._errors.pop(profile, None)
                if not keep:
                    self._discard(attached)
        except Exception as exc:  # no daemon, no image: reported by status(), retried on demand
            log.warning("warm pool: cannot create a %s container: %s", profile.image, exc)
            with self._lock:
                self._errors[profile] = str(exc)
        finally:
            with self._lock:
                self._filling.discard(profile)

    def _wants(self, profile: Profile) -> bool:
        with self._lock:
            idle = self._idle.get(profile)
            return not self._closed and idle is not None and len(idle) < self._size

    def _discard(self, attached: Attached) -> None:
        attached.close()
        self._factory.destroy(attached.container_id)
