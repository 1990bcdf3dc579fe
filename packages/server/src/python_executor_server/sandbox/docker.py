"""The Docker sandbox backend: one single-use container per run, warm when possible.

Each run gets a container (``docker_pool.host_config`` is the whole
enforcement): user 1000:1000, read-only root, ``/work`` and ``/tmp`` as tmpfs
of ``disk_mb`` each, ``cap_drop=ALL``, ``no-new-privileges``, memory with
swap equal to memory, pids and cpu shares, ``network_mode=none`` unless the
run asked for network (then ``settings.docker_network``), no Docker socket
and no host path (only the read-only ``RunSpec.mounts`` the runner asks for),
labels ``python-executor=1`` / ``python-executor.execution=<id>``, logging
off, auto-removed on exit. The project is sent as a tar over the attach
socket and unpacked by the waiter (``docker_waiter.py``) into the tmpfs, so it
counts against ``disk_mb``; the program's output comes back over the same
socket, framed by the waiter, as it is produced.

The host interpreter in ``argv[0]`` becomes the image's ``python3``
(``docker_protocol.image_argv``). The environment is exactly ``spec.env``
(the image's ENV is not added). ``result_fd`` is a pipe inside the
container; what the program writes there is returned as ``side_channel``.
Exit codes: the program's code, or ``128 + N`` when signal N killed it (as on bwrap).

docker-py is blocking: request-path calls go through ``anyio.to_thread``,
the warm pool's refills through its own threads (they outlive requests).

Usage::

    backend = DockerBackend(settings)
    await backend.start()
    outcome = await backend.run(spec, sink)
    image = resolve_image(settings, metadata.docker_image, metadata.python_version)
"""

from __future__ import annotations

import fnmatch
import logging
import shutil
from pathlib import Path
from typing import IO, Any

import anyio
from anyio.abc import SocketStream

from ..errors import BadRequest, SandboxError
from ..settings import Settings
from .base import Limits, OutputSink, RunOutcome, RunSpec
from .docker_pool import Attached, ContainerFactory, Profile, WarmPool
from .docker_protocol import (
    SPOOL_BYTES,
    ProtocolError,
    ReplyParser,
    encode_job,
    image_argv,
    pack_workspace,
)

log = logging.getLogger(__name__)

DEFAULT_VERSIONS = ("3.10", "3.11", "3.12", "3.13")
CHUNK = 256 * 1024
WAITER_GRACE_SECONDS = 10  # the waiter's own deadline, a backstop behind ours


def configured_images(settings: Settings) -> dict[str, str]:
    """python_version -> image: ``docker_images``, else ``python:3.X-slim``."""
    if settings.docker_images:
        return dict(settings.docker_images)
    return {v: f"python:{v}-slim" for v in DEFAULT_VERSIONS}


def allowed_images(settings: Settings) -> list[str]:
    return sorted(
        {settings.default_image, *configured_images(settings).values()}
        | set(settings.docker_allowed_images)
    )


def resolve_image(settings: Settings, docker_image: str | None, python_version: str | None) -> str:
    """The image a request runs in; raises ``BadRequest`` for one it may not use.

    ``docker_image`` wins when given and allowed: the default image, the
    configured ones and ``docker_allowed_images`` (entries may be
    ``fnmatch`` patterns such as ``python:3.*-slim``). Otherwise
    ``python_version`` picks from ``configured_images``; neither: the default.
    """
    if docker_image:
        allowed = allowed_images(settings)
        if any(fnmatch.fnmatchcase(docker_image, pattern) for pattern in allowed):
            return docker_image
        raise BadRequest(
            f"docker_image {docker_image!r} is not allowed; allowed: {', '.join(allowed)}"
        )
    if python_version:
        images = configured_images(settings)
        if python_version not in images:
            raise BadRequest(
                f"python_version {python_version!r} is not available; "
                f"available: {', '.join(sorted(images))}"
            )
        return images[python_version]
    return settings.default_image


def default_limits(settings: Settings, network: bool = False) -> Limits:
    """The limits a request without ``config`` gets: the profile the pool keeps warm."""
    return Limits(
        timeout_seconds=settings.default_timeout,
        memory_mb=settings.default_memory_mb,
        disk_mb=settings.default_disk_mb,
        cpu_shares=settings.default_cpu_shares,
        pids=settings.default_pids,
        network=network,
        output_cap_bytes=settings.output_cap_bytes,
    )


class DockerBackend:
    """``SandboxBackend`` on a Docker daemon (``PYEXEC_SANDBOX=docker``)."""

    name = "docker"

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._client: Any = None
        self._factory: ContainerFactory | None = None
        self._pool: WarmPool | None = None
        self._running: dict[str, Attached] = {}
        self._info: dict[str, Any] = {}

    # --- lifecycle ------------------------------------------------------------

    async def start(self) -> None:
        self._client = await anyio.to_thread.run_sync(_connect, self._settings.docker_socket)
        self._factory = ContainerFactory(self._client.api, self._settings)
        self._info = await anyio.to_thread.run_sync(self._probe)
        reaped = await anyio.to_thread.run_sync(self._factory.reap)
        if reaped:
            log.info("removed %d orphaned sandbox containers", reaped)
        self._pool = WarmPool(self._factory, self._settings.docker_pool_size)
        if self._info["default_image_present"]:
            self._pool.warm(
                self.profile(self._settings.default_image, default_limits(self._settings))
            )

    def warm(self, spec: RunSpec) -> None:
        """The default image's containers are warmed by ``start``; any other profile from
        its first run on (``run``)."""

    async def close(self) -> None:
        pool, factory = self._pool, self._factory
        self._pool = self._factory = None
        if pool is not None:
            await anyio.to_thread.run_sync(pool.close)
        if factory is not None:
            for attached in list(self._running.values()):
                await anyio.to_thread.run_sync(factory.destroy, attached.container_id)
            await anyio.to_thread.run_sync(factory.reap)
        if self._client is not None:
            await anyio.to_thread.run_sync(self._client.close)
            self._client = None

    def describe(self) -> dict[str, Any]:
        return {
            "backend": self.name,
            **self._info,
            "user": "1000:1000",
            "read_only_root": True,
            "capabilities": "none (cap_drop=ALL, no-new-privileges)",
            "seccomp": "docker default profile",
            "network_when_enabled": self._settings.docker_network,
            "warm_pool": self._pool.status() if self._pool is not None else {},
        }

    def _probe(self) -> dict[str, Any]:
        info = self._client.info()
        try:
            self._client.api.inspect_image(self._settings.default_image)
            present = True
        except Exception:
            present = False
            log.warning(
                "default image %s is missing (build it: make docker-image)",
                self._settings.default_image,
            )
        return {
            "docker_version": info.get("ServerVersion"),
            "cgroup_version": info.get("CgroupVersion"),
            "default_image": self._settings.default_image,
            "default_image_present": present,
        }

    def profile(self, image: str, limits: Limits, spec: RunSpec | None = None) -> Profile:
        return Profile.of(image, limits, self._settings, spec.mounts if spec else ())

    async def wait_warm(self, profile: Profile, count: int = 1, within: float = 30) -> bool:
        """Wait until ``count`` containers of ``profile`` are warm (tests, benchmarks)."""
        if self._pool is None:
            return False
        self._pool.warm(profile)
        for _ in range(int(within / 0.02)):
            if self._pool.ready(profile) >= count:
                return True
            await anyio.sleep(0.02)
        return False

    # --- workspaces -------------------------------------------------------------

    async def create_workspace(
        self, execution_id: str, disk_mb: int, spec: RunSpec | None = None
    ) -> Path:
        # The pool is chosen in run() (the project travels as a tar): spec is not needed.
        path = self._settings.runs_path / execution_id
        await anyio.to_thread.run_sync(lambda: path.mkdir(parents=True, mode=0o700))
        return path

    async def remove_workspace(self, path: Path) -> None:
        await anyio.to_thread.run_sync(lambda: shutil.rmtree(path, ignore_errors=True))

    # --- one run ----------------------------------------------------------------

    async def run(self, spec: RunSpec, sink: OutputSink) -> RunOutcome:
        if self._factory is None:
            raise SandboxError("the docker backend is not started")
        if spec.result_fd is not None and not 3 <= spec.result_fd < 100:
            raise SandboxError(f"result_fd must be within 3..99, not {spec.result_fd}")
        image = spec.image or self._settings.default_image
        tar, tar_size = await anyio.to_thread.run_sync(pack_workspace, spec.workdir)
        try:
            return await self._run(
                spec, sink, self.profile(image, spec.limits, spec), tar, tar_size
            )
        finally:
            tar.close()

    async def _run(
        self, spec: RunSpec, sink: OutputSink, profile: Profile, tar: IO[bytes], tar_size: int
    ) -> RunOutcome:
        attached: Attached | None = None
        try:
            attached = await self._acquire(profile, spec.execution_id)
            self._running[spec.execution_id] = attached
            with anyio.move_on_after(spec.limits.timeout_seconds) as deadline:
                parser = await self._exchange(attached, spec, sink, tar, tar_size)
            if deadline.cancelled_caught:
                await self._kill(attached)
                return RunOutcome(exit_code=None, timed_out=True)
            return await self._outcome(attached, parser)
        except SandboxError as exc:
            return RunOutcome(exit_code=None, error=exc.message)
        except anyio.get_cancelled_exc_class():
            with anyio.CancelScope(shield=True):
                if attached is not None:
                    await self._kill(attached)
            raise
        finally:
            self._running.pop(spec.execution_id, None)
            if attached is not None:
                attached.close()
            if self._pool is not None and self._poolable(profile):
                self._pool.refill(profile)

    async def _acquire(self, profile: Profile, execution_id: str) -> Attached:
        pool = self._pool if self._poolable(profile) else None
        attached = pool.take(profile) if pool is not None else None
        if attached is not None:
            return attached
        if pool is not None:
            pool.warm(profile)  # each (image, network) seen is kept warm from now on
        assert self._factory is not None
        # Shielded: a container half-made when the caller gives up would leak.
        with anyio.CancelScope(shield=True):
            try:
                made = await anyio.to_thread.run_sync(self._factory.create, profile, execution_id)
            except Exception as exc:
                raise SandboxError(_explain(exc, profile.image)) from exc
        try:
            await anyio.lowlevel.checkpoint()
        except anyio.get_cancelled_exc_class():
            with anyio.CancelScope(shield=True):
                await self._kill(made)
            made.close()
            raise
        return made

    async def _exchange(
        self, attached: Attached, spec: RunSpec, sink: OutputSink, tar: IO[bytes], tar_size: int
    ) -> ReplyParser:
        stdin = spec.stdin or b""
        header = encode_job(
            image_argv(spec.argv, str(spec.interpreter.executable)),
            spec.env,
            result_fd=spec.result_fd,
            tar_size=tar_size,
            stdin_size=len(stdin),
            timeout=spec.limits.timeout_seconds + WAITER_GRACE_SECONDS,
        )
        parser = ReplyParser(sink, result_cap=max(spec.limits.output_cap_bytes, 1 << 20))
        stream = await SocketStream.from_socket(attached.detach_socket())
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(_send, stream, header, tar, tar_size, stdin)
                await _receive(stream, parser)
                tg.cancel_scope.cancel()
        finally:
            with anyio.CancelScope(shield=True):
                await stream.aclose()
        return parser

    async def _outcome(self, attached: Attached, parser: ReplyParser) -> RunOutcome:
        result = bytes(parser.result)
        if parser.failure is not None:
            return RunOutcome(exit_code=None, error=f"sandbox setup failed: {parser.failure}")
        report = parser.exit
        if report is None:  # the waiter died: the whole container went down
            oom = await anyio.to_thread.run_sync(self._oom_killed, attached.container_id)
            stderr = parser.waiter_stderr.decode("utf-8", "replace").strip()[-500:]
            error = None if oom else f"the sandbox container exited unexpectedly {stderr}".strip()
            return RunOutcome(exit_code=None, oom_killed=oom, side_channel=result, error=error)
        return RunOutcome(
            exit_code=report.exit_code,
            oom_killed=bool(report.oom_kills),
            side_channel=result,
            cpu_ms=report.cpu_ms,
            peak_memory_mb=report.peak_memory_mb,
        )

    def _oom_killed(self, container_id: str) -> bool:
        try:
            state = self._client.api.inspect_container(container_id)["State"]
        except Exception:  # auto-removed already: we cannot tell
            return False
        return bool(state.get("OOMKilled"))

    def _poolable(self, profile: Profile) -> bool:
        """Only the default limits are kept warm: one profile per (image, network)."""
        network = profile.network != "none"
        return profile == self.profile(profile.image, default_limits(self._settings, network))

    async def _kill(self, attached: Attached) -> None:
        assert self._factory is not None
        await anyio.to_thread.run_sync(self._factory.destroy, attached.container_id)


async def _send(
    stream: SocketStream, header: bytes, tar: IO[bytes], size: int, stdin: bytes
) -> None:
    try:
        await stream.send(header)
        while chunk := (
            await anyio.to_thread.run_sync(tar.read, CHUNK)
            if size > SPOOL_BYTES
            else tar.read(CHUNK)
        ):
            await stream.send(chunk)
        if stdin:
            await stream.send(stdin)
    except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
        pass  # the waiter stopped reading (the project did not fit, ...): its reply says why


async def _receive(stream: SocketStream, parser: ReplyParser) -> None:
    while not parser.done:
        try:
            data = await stream.receive(CHUNK)
        except (anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError):
            return
        try:
            parser.feed(data)
        except ProtocolError as exc:  # not raised: it would come out of a task group
            parser.failure = f"the sandbox container broke protocol: {exc}"


def _connect(base_url: str) -> Any:
    try:
        import docker  # type: ignore[import-untyped]
    except ImportError as exc:
        raise SandboxError(
            "the docker backend needs docker-py: pip install 'python-executor-server[docker]'"
        ) from exc
    client = None
    try:
        client = docker.DockerClient(base_url=base_url, timeout=120)
        client.ping()
    except Exception as exc:
        if client is not None:
            client.close()
        raise SandboxError(f"no Docker daemon answers at {base_url}: {exc}") from exc
    return client


def _explain(exc: Exception, image: str) -> str:
    if type(exc).__name__ == "ImageNotFound":
        return (
            f"image {image!r} is not on the Docker host and the server never pulls: "
            "build it (make docker-image) or load it there"
        )
    return f"could not start a sandbox container: {exc}"
