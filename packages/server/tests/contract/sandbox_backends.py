"""The sandbox contract suite's backends: every ``SandboxBackend``, started for real.

``box`` (a fixture; test modules import ``box_fixture`` and
``contract_interpreter_fixture``) is parametrized over ``bwrap`` (every run
cold), ``bwrap-pool`` (every run in a sandbox the pool started ahead of it) and
``docker`` (a cold container per run); it yields a ``Box``: the started backend,
the interpreter, and ``run()``, which takes the runner's steps (plan the spec,
``create_workspace(..., spec)``, fill the workspace, ``run`` with that workdir)
and runs the very command the runner builds (``driver_argv`` with ``RESULT_FD``,
the runner's environment). After every run ``Box.run`` checks that nothing of
it is left: no host process with the run's marker in its environment or its
workspace as its working directory (container processes are host processes
too), and, on docker, no container of the run.

Prerequisites: bwrap needs root and bubblewrap (skip locally, fail when ``CI``
is set, like ``tests/sandbox/conftest.py``); docker needs a daemon answering at
``PYEXEC_DOCKER_SOCKET`` (skip only when none answers and ``CI`` is not
``true``) and the image ``python-executor-sandbox:latest`` (``make docker-image``;
its absence is a failure, not a skip).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import shutil
import socket
import subprocess
import tempfile
import textwrap
import time
import uuid
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

import anyio
import pytest
from proc_scan import dying
from python_executor_server.execution import driver
from python_executor_server.execution.interpreters import default_version, discover_interpreters
from python_executor_server.execution.runner import BASE_ENV
from python_executor_server.sandbox.base import (
    SANDBOX_WORKDIR,
    CollectedOutput,
    Interpreter,
    Limits,
    Mount,
    RunOutcome,
    RunSpec,
    SandboxBackend,
)
from python_executor_server.settings import Settings

MIB = 1024 * 1024
MARKER_VAR = "PYEXEC_CONTRACT_MARKER"
DOCKER_IMAGE = "python-executor-sandbox:latest"
DOCKER_INSTANCE = f"contract-{uuid.uuid4().hex[:8]}"  # our containers only: others share the daemon
ENTRYPOINT = f"{SANDBOX_WORKDIR}/main.py"

# What each backend documents about itself, asserted where the contract leaves room.
ENV_ADDITIONS = {  # variables a backend adds to spec.env (tests/sandbox, docs/docker.md)
    "bwrap": {"PWD": SANDBOX_WORKDIR},  # bwrap --chdir sets PWD
    "docker": {},  # "Exactly spec.env"
}
DISK_CAP_SHARED = {  # /work and /tmp: one cap (docs/security.md) or one each (docs/docker.md)
    "bwrap": True,
    "docker": False,
}

BACKENDS = [
    pytest.param("bwrap", marks=pytest.mark.sandbox, id="bwrap"),  # every run cold
    # every run pooled: forked from the zygote (the default) / started by bwrap ahead
    pytest.param("bwrap-pool", marks=pytest.mark.sandbox, id="bwrap-pool"),
    pytest.param("bwrap-pool-nozygote", marks=pytest.mark.sandbox, id="bwrap-pool-nozygote"),
    pytest.param("docker", marks=pytest.mark.docker, id="docker"),  # a cold container each
]


# --- observing a run ---------------------------------------------------------------


def run_pids(marker: str, workdir: Path) -> list[int]:
    """Host pids with ``marker`` in their environment or ``workdir`` as their working
    directory (zombies have neither: not counted)."""
    needle = f"{MARKER_VAR}={marker}".encode()
    try:
        work = os.stat(workdir)
        where: tuple[int, int] | None = (work.st_dev, work.st_ino)
    except OSError:
        where = None
    found = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/environ", "rb") as f:
                marked = needle in f.read()
            cwd = os.stat(f"/proc/{entry.name}/cwd")
        except OSError:
            continue
        if marked or (cwd.st_dev, cwd.st_ino) == where:
            found.append(int(entry.name))
    return found


class CountingSink:
    """Counts every byte the backend delivers; keeps the first ``cap`` of each stream."""

    def __init__(self, cap: int = 8 * MIB) -> None:
        self.kept = CollectedOutput(cap=cap)
        self.counts = {"stdout": 0, "stderr": 0}

    def write(self, stream: str, data: bytes) -> None:
        self.counts[stream] += len(data)
        self.kept.write(stream, data)

    def text(self, stream: str) -> str:
        return self.kept.text(stream)


@dataclass
class Ran:
    spec: RunSpec
    outcome: RunOutcome
    sink: CountingSink
    elapsed: float

    @property
    def stdout(self) -> str:
        return self.sink.text("stdout")

    @property
    def stderr(self) -> str:
        return self.sink.text("stderr")

    @property
    def report(self) -> driver.DriverReport:
        return driver.parse_report(self.outcome.side_channel)

    @property
    def explain(self) -> str:
        """Everything about the run, for an assertion message."""
        return f"{self.outcome}\nstdout: {self.stdout[-2000:]!r}\nstderr: {self.stderr[-2000:]}"

    def fields(self, count: int) -> list[str]:
        """The words of stdout; exactly ``count`` of them, or a failure that says why."""
        words = self.stdout.split()
        assert len(words) == count, self.explain
        return words

    def lines(self, count: int) -> list[str]:
        """The lines of stdout; exactly ``count`` of them, or a failure that says why."""
        lines = self.stdout.splitlines()
        assert len(lines) == count, self.explain
        return lines


async def eventually(predicate: Any, within: float = 30.0) -> Any:
    """Poll ``predicate`` until it returns something truthy (fail after ``within`` s)."""
    with anyio.fail_after(within):
        while True:
            value = predicate()
            if value:
                return value
            await anyio.sleep(0.02)


# --- the box -----------------------------------------------------------------------


@dataclass
class Box:
    """One started backend and the runner's way of building a run for it."""

    kind: str  # the backend's name
    backend: SandboxBackend
    interpreter: Interpreter
    settings: Settings
    docker_api: Any = None
    pooled: bool = False  # every run must get a sandbox started ahead of it (bwrap's pool)
    workspaces: list[Path] = field(default_factory=list)

    def limits(self, **overrides: Any) -> Limits:
        values: dict[str, Any] = {
            "timeout_seconds": 30,
            "memory_mb": 256,
            "disk_mb": 64,
            "cpu_shares": 1024,
            "pids": 64,
            "network": False,
            "output_cap_bytes": 8 * MIB,
        }
        return Limits(**{**values, **overrides})

    def plan(
        self,
        *,
        env: dict[str, str] | None = None,
        stdin: bytes | None = None,
        args: Sequence[str] = (),
        pre_commands: Sequence[str] = (),
        eval_last_expr: bool = False,
        mounts: tuple[Mount, ...] = (),
        **limits: Any,
    ) -> RunSpec:
        """What ``Runner._spec`` builds (the driver command, the runner's environment, a
        unique marker in it), before the backend gives it a workspace."""
        argv = driver.driver_argv(
            str(self.interpreter.executable),
            entrypoint=ENTRYPOINT,
            args=args,
            eval_last_expr=eval_last_expr,
            pre_commands=pre_commands,
            result_fd=driver.RESULT_FD,
            extra_paths=[m.target for m in mounts],
        )
        path = f"{self.interpreter.prefix}/bin:{BASE_ENV['PATH']}"
        return RunSpec(
            execution_id=f"exe_{uuid.uuid4()}",
            workdir=Path(SANDBOX_WORKDIR),  # not known yet, as in the runner
            interpreter=self.interpreter,
            argv=argv,
            env={**BASE_ENV, "PATH": path, **(env or {}), MARKER_VAR: uuid.uuid4().hex},
            limits=self.limits(**limits),
            stdin=stdin,
            mounts=mounts,
            result_fd=driver.RESULT_FD,
            prestart=driver.PRESTART,
        )

    async def prepare(
        self, code: str, *, files: dict[str, str] | None = None, **options: Any
    ) -> RunSpec:
        """The runner's steps before ``run``: plan, ``create_workspace(..., spec)``, fill it
        (as the server's user) with ``code`` as main.py and ``files``."""
        planned = self.plan(**options)
        pooled = self.pooled and not planned.mounts  # mounts belong to one run: never pooled
        if pooled:
            await self._pool_ready(planned)
        hits = self._pool_hits()
        work = await self.backend.create_workspace(
            planned.execution_id, planned.limits.disk_mb, planned
        )
        self.workspaces.append(work)
        if pooled:
            assert self._pool_hits() == hits + 1, "the run did not get a pre-started sandbox"
        for name, text in {"main.py": code, **(files or {})}.items():
            (work / name).parent.mkdir(parents=True, exist_ok=True)
            (work / name).write_text(textwrap.dedent(text))
        return dataclasses.replace(planned, workdir=work)

    async def run(self, code: str, *, sink: CountingSink | None = None, **options: Any) -> Ran:
        """Run ``code`` as /work/main.py; then assert that nothing of the run is left."""
        spec = await self.prepare(code, **options)
        sink = sink or CountingSink()
        started = time.monotonic()
        outcome = await self.backend.run(spec, sink)
        elapsed = time.monotonic() - started
        await self.assert_nothing_left(spec)
        return Ran(spec, outcome, sink, elapsed)

    def pids(self, spec: RunSpec) -> list[int]:
        """Host processes of the run: with its marker in their environment, or their working
        directory in its workspace (a pre-started program got its environment later, over
        its job socket, so /proc shows the one it was started with)."""
        return run_pids(spec.env[MARKER_VAR], spec.workdir)

    async def assert_nothing_left(self, spec: RunSpec) -> None:
        # A zygote's fork is answered once its processes are killed, before they have all
        # finished exiting (Box.end_reported): dying at the answer, gone after the cleanup.
        running = [pid for pid in self.pids(spec) if not dying(pid)]
        assert running == [], f"processes of {spec.execution_id} ran on after its run"
        await asyncio.gather(*getattr(self.backend, "_ending", ()))
        assert self.pids(spec) == [], f"a process of {spec.execution_id} outlived its run"
        if self.docker_api is not None:
            left = await anyio.to_thread.run_sync(self.containers_after, spec.execution_id)
            assert left == [], f"containers of {spec.execution_id} left: {left}"

    # --- bwrap's pool, through describe() ----------------------------------------------

    def _pool_hits(self) -> int:
        pool = self.backend.describe().get("pool") or {}
        return int(pool.get("hits", 0))

    def _ready(self, spec: RunSpec) -> bool:
        keys = (self.backend.describe().get("pool") or {}).get("keys", [])
        return any(
            (k["python"], k["network"], k["disk_mb"], k["ready"] > 0)
            == (self.interpreter.version, spec.limits.network, spec.limits.disk_mb, True)
            for k in keys
        )

    async def _pool_ready(self, spec: RunSpec) -> None:
        """Teach the pool this run's key (a first workspace, given back unused) and wait
        until a sandbox of it has started."""
        if not self._ready(spec):
            primer = await self.backend.create_workspace(
                f"exe_prime_{uuid.uuid4()}", spec.limits.disk_mb, spec
            )
            await self.backend.remove_workspace(primer)
        await eventually(lambda: self._ready(spec), within=30)

    def containers_after(self, execution_id: str, within: float = 10) -> list[str]:
        """Containers of the run still there after ``within`` s (auto-removal is async)."""
        labels = [f"python-executor.instance={DOCKER_INSTANCE}"]
        labels.append(f"python-executor.execution={execution_id}")
        deadline = time.monotonic() + within
        while True:
            found = self.docker_api.containers(all=True, filters={"label": labels})
            if not found or time.monotonic() > deadline:
                return [c["Id"][:12] for c in found]
            time.sleep(0.1)


# --- prerequisites -----------------------------------------------------------------


def _bwrap_missing() -> str | None:
    if os.geteuid() != 0:
        return "the bwrap backend needs root here (cgroups, tmpfs work dirs, uid 1000)"
    if shutil.which("bwrap") is None:
        return "bubblewrap (bwrap) is not installed"
    return None


def _no_docker(reason: str) -> NoReturn:
    if os.environ.get("CI") == "true":
        pytest.fail(f"Docker tests must run in CI: {reason}")
    pytest.skip(reason)


def _docker_api(base_url: str) -> Any:
    """docker-py's low-level client, or skip (fail in CI) when no daemon answers."""
    try:
        import docker  # type: ignore[import-untyped]
    except ImportError:
        _no_docker("docker-py is not installed (pip install 'python-executor-server[docker]')")
    if base_url.startswith("unix://"):  # docker-py leaks the socket of a failed connect
        with socket.socket(socket.AF_UNIX) as sock:
            try:
                sock.connect(base_url.removeprefix("unix://"))
            except OSError as exc:
                _no_docker(f"no Docker daemon answers at {base_url}: {exc}")
    client = docker.DockerClient(base_url=base_url, timeout=60)
    try:
        client.ping()
    except Exception as exc:
        client.close()
        _no_docker(f"no Docker daemon answers at {base_url} (scripts/start-dockerd.sh): {exc}")
    try:
        client.api.inspect_image(DOCKER_IMAGE)
    except Exception:
        client.close()
        pytest.fail(f"a Docker daemon answers but {DOCKER_IMAGE} is missing: make docker-image")
    return client


def bridge_gateway() -> str | None:
    """This host's address on Docker's default bridge (docker0), if there is one."""
    try:
        out = subprocess.run(
            ["ip", "-4", "-o", "addr", "show", "dev", "docker0"],
            capture_output=True,
            text=True,
            check=False,
        ).stdout
    except OSError:
        return None
    words = out.split()
    return words[words.index("inet") + 1].split("/")[0] if "inet" in words else None


# --- fixtures ----------------------------------------------------------------------


@pytest.fixture(scope="session", name="contract_interpreter")
def contract_interpreter_fixture() -> Interpreter:
    """The server's default interpreter; the docker backend maps it to the image's python3."""
    settings = Settings()
    found = discover_interpreters(settings)
    return found[default_version(settings, found)]


@contextlib.contextmanager
def _bwrap_settings(pool: bool, zygote: bool = True) -> Iterator[Settings]:
    # Not under pytest's tmp_path: /tmp/pytest-of-root is 0700, uid 1000 could not reach it.
    from python_executor_server.sandbox.mounts import mount_points_under, unmount

    run_dir = Path(tempfile.mkdtemp(prefix="pyexec-contract-", dir="/tmp"))
    os.chmod(run_dir, 0o711)
    try:
        yield Settings(
            run_dir=run_dir,
            data_dir=run_dir / "data",
            cgroup_root=f"pyexec-contract-{os.getpid()}",
            max_archive_entries=1000,
            pool_enabled=pool,
            pool_size=1,
            pool_zygote=zygote,
            pool_zygote_size=1,
        )
    finally:
        for point in mount_points_under(run_dir):
            unmount(point)
        if not mount_points_under(run_dir):
            shutil.rmtree(run_dir, ignore_errors=True)


@contextlib.asynccontextmanager
async def _started(box: Box) -> AsyncIterator[Box]:
    await box.backend.start()
    try:
        yield box
    finally:
        for work in box.workspaces:
            await box.backend.remove_workspace(work)
        await box.backend.close()


@contextlib.asynccontextmanager
async def bwrap_box(
    interpreter: Interpreter, pooled: bool, zygote: bool = True
) -> AsyncIterator[Box]:
    reason = _bwrap_missing()
    if reason is not None:
        if os.environ.get("CI"):
            pytest.fail(f"sandbox tests must run in CI: {reason}")
        pytest.skip(reason)
    from python_executor_server.sandbox.bwrap import BwrapBackend

    with _bwrap_settings(pool=pooled, zygote=zygote) as settings:
        backend = BwrapBackend(settings, {interpreter.version: interpreter})
        async with _started(Box("bwrap", backend, interpreter, settings, pooled=pooled)) as box:
            yield box


@contextlib.asynccontextmanager
async def docker_box(interpreter: Interpreter, tmp_path: Path) -> AsyncIterator[Box]:
    from python_executor_server.sandbox.docker import DockerBackend

    client = _docker_api(Settings().docker_socket)
    settings = Settings(
        run_dir=tmp_path / "runs",
        data_dir=tmp_path / "data",
        docker_instance=DOCKER_INSTANCE,
        default_image=DOCKER_IMAGE,
        docker_pool_size=0,  # every run a cold container: the path every profile can take
    )
    try:
        backend = DockerBackend(settings)
        async with _started(Box("docker", backend, interpreter, settings, client.api)) as box:
            yield box
        labels = [f"python-executor.instance={DOCKER_INSTANCE}"]
        left = client.api.containers(all=True, filters={"label": labels})
        assert left == [], f"containers left after close(): {[c['Id'][:12] for c in left]}"
    finally:
        client.close()


@pytest.fixture(params=BACKENDS, name="box")
async def box_fixture(
    request: pytest.FixtureRequest, contract_interpreter: Interpreter, tmp_path: Path
) -> AsyncIterator[Box]:
    """A started backend of each kind, torn down (workspaces removed, closed) after the test."""
    if request.param == "docker":
        opened = docker_box(contract_interpreter, tmp_path)
    else:
        pooled = request.param.startswith("bwrap-pool")
        zygote = request.param != "bwrap-pool-nozygote"
        opened = bwrap_box(contract_interpreter, pooled=pooled, zygote=zygote)
    async with opened as box:
        yield box
