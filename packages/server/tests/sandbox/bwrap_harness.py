"""The harness of the real-sandbox suite: runs a Python program in a started
``BwrapBackend`` and then proves that no process of the run is left.

Every run carries a unique marker in its environment; after the run returns,
``/proc`` is scanned for it (``/proc/<pid>/environ`` survives fork, exec, setsid
and daemonising), so each test also checks "nothing of the run remains".

Runs through the eval driver (``run_driver``), as the runner makes them, can be
handed to a pre-started sandbox of the backend's pool. The driver process itself
keeps the environment it was launched with (the job's is set inside it), and so
do the children it forks without exec: for those runs the harness also checks
that no process is left in the run's pid namespace.

The fixtures are in conftest.py; tests import the helpers from here.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import textwrap
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TypeVar

import anyio
from proc_scan import dying, pids_with_env
from python_executor_server.execution import driver
from python_executor_server.sandbox.base import (
    CollectedOutput,
    Interpreter,
    Limits,
    Mount,
    OutputSink,
    RunOutcome,
    RunSpec,
)
from python_executor_server.sandbox.bwrap import BwrapBackend
from python_executor_server.settings import Settings

T = TypeVar("T")
MARKER_VAR = "PYEXEC_TEST_MARKER"
BASE_ENV = {
    "PATH": "/usr/local/bin:/usr/bin:/bin",
    "HOME": "/work",
    "LANG": "C.UTF-8",
    "PYTHONUNBUFFERED": "1",
    "PYTHONDONTWRITEBYTECODE": "1",
}


def marker_pids(marker: str) -> list[int]:
    """Host pids whose environment carries ``marker`` (zombies have none: not counted)."""
    return pids_with_env(MARKER_VAR, marker)


def pid_namespace(pid: int) -> int:
    return os.stat(f"/proc/{pid}/ns/pid").st_ino


def namespace_pids(namespace: int) -> list[int]:
    """Host pids of the processes in the pid namespace ``namespace`` (an nsfs inode)
    that can still run code. Not counted: zombies, and processes in the last steps of
    exiting (their memory is gone already: no ``VmSize``)."""
    found = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                if os.stat(f"/proc/{entry.name}/ns/pid").st_ino != namespace:
                    continue
                status = host_status(int(entry.name))
                if status.get("State", "Z")[0] not in "ZX" and "VmSize" in status:
                    found.append(int(entry.name))
    return found


def host_status(pid: int) -> dict[str, str]:
    with open(f"/proc/{pid}/status") as f:
        return dict(line.rstrip("\n").split(":\t", 1) for line in f if ":\t" in line)


@dataclass
class Ran:
    outcome: RunOutcome
    output: CollectedOutput
    workdir: Path
    marker: str
    elapsed: float

    @property
    def stdout(self) -> str:
        return self.output.text("stdout")

    @property
    def stderr(self) -> str:
        return self.output.text("stderr")


@dataclass
class Harness:
    backend: BwrapBackend
    interpreter: Interpreter
    settings: Settings
    workspaces: list[Path] = field(default_factory=list)

    def limits(self, **overrides: Any) -> Limits:
        values: dict[str, Any] = {
            "timeout_seconds": 30,
            "memory_mb": 256,
            "disk_mb": 64,
            "cpu_shares": 1024,
            "pids": 64,
            "network": False,
            "output_cap_bytes": 8 * 1024 * 1024,
        }
        values.update(overrides)
        return Limits(**values)

    async def workspace(self, files: dict[str, str] | None = None, disk_mb: int = 64) -> Path:
        work = await self.backend.create_workspace(f"exe_{uuid.uuid4()}", disk_mb)
        self.workspaces.append(work)
        for name, text in (files or {}).items():  # written as root, like the runner does
            (work / name).parent.mkdir(parents=True, exist_ok=True)
            (work / name).write_text(text)
        return work

    def spec(
        self,
        work: Path,
        *,
        argv: tuple[str, ...] | None = None,
        env: dict[str, str] | None = None,
        marker: str = "",
        stdin: bytes | None = None,
        result_fd: int | None = None,
        mounts: tuple[Mount, ...] = (),
        **limits: Any,
    ) -> RunSpec:
        return RunSpec(
            execution_id=work.parent.name,
            workdir=work,
            interpreter=self.interpreter,
            argv=argv or (str(self.interpreter.executable), "-I", "/work/main.py"),
            env={**BASE_ENV, **(env or {}), MARKER_VAR: marker},
            limits=self.limits(**limits),
            stdin=stdin,
            result_fd=result_fd,
            mounts=mounts,
        )

    async def run(
        self,
        code: str,
        *,
        files: dict[str, str] | None = None,
        sink: OutputSink | None = None,
        disk_mb: int = 64,
        **options: Any,
    ) -> Ran:
        """Run ``code`` as /work/main.py; assert that no process of it survives."""
        work = await self.workspace({"main.py": textwrap.dedent(code), **(files or {})}, disk_mb)
        marker = uuid.uuid4().hex
        spec = self.spec(work, marker=marker, disk_mb=disk_mb, **options)
        output = CollectedOutput()
        started = time.monotonic()
        outcome = await self.backend.run(spec, sink or output)
        elapsed = time.monotonic() - started
        assert marker_pids(marker) == [], "a process of the run survived it"
        return Ran(outcome, output, work, marker, elapsed)


def driver_spec(
    harness: Harness,
    *,
    marker: str,
    env: dict[str, str] | None = None,
    stdin: bytes | None = None,
    args: tuple[str, ...] = (),
    eval_last_expr: bool = False,
    pre_commands: tuple[str, ...] = (),
    **limits: Any,
) -> RunSpec:
    """What the runner builds: the eval driver, pre-startable; its workdir comes later."""
    python = str(harness.interpreter.executable)
    argv = driver.driver_argv(
        python,
        entrypoint="/work/main.py",
        args=args,
        eval_last_expr=eval_last_expr,
        pre_commands=pre_commands,
        result_fd=driver.RESULT_FD,
    )
    path = f"{harness.interpreter.prefix}/bin:{BASE_ENV['PATH']}"
    return RunSpec(
        execution_id=f"exe_{uuid.uuid4()}",
        workdir=Path("/work"),
        interpreter=harness.interpreter,
        argv=argv,
        env={**BASE_ENV, "PATH": path, **(env or {}), MARKER_VAR: marker},
        limits=harness.limits(**limits),
        stdin=stdin,
        result_fd=driver.RESULT_FD,
        prestart=driver.PRESTART,
    )


async def pooled_workspace(harness: Harness, spec: RunSpec) -> Path:
    """The workspace of a sandbox of the pool handed out for ``spec`` (waiting until one
    is ready); removed with the harness."""
    backend = harness.backend
    assert await backend.wait_warm(spec), "the pool never got a sandbox ready"
    work = await backend.create_workspace(spec.execution_id, spec.limits.disk_mb, spec)
    harness.workspaces.append(work)
    assert work in backend._claimed, "not handed a pre-started sandbox"
    return work


async def run_driver(
    harness: Harness,
    code: str,
    *,
    pooled: bool,
    files: dict[str, str] | None = None,
    sink: OutputSink | None = None,
    **options: Any,
) -> Ran:
    """Run ``code`` as /work/main.py through the driver: in a sandbox of the pool
    (``pooled``, waiting until one is ready) or cold. Asserts that nothing of it is left."""
    marker = uuid.uuid4().hex
    spec = driver_spec(harness, marker=marker, **options)
    backend = harness.backend
    namespace = None
    if pooled:
        work = await pooled_workspace(harness, spec)
        # The namespace the init's children are in: bwrap's init's own, or the one a
        # zygote's fork made for its run (zygote.py).
        init = backend._claimed[work].box.init
        assert init is not None
        namespace = os.stat(f"/proc/{init.pid}/ns/pid_for_children").st_ino
    else:
        work = await backend.create_workspace(spec.execution_id, spec.limits.disk_mb)
        harness.workspaces.append(work)
    for name, text in {"main.py": textwrap.dedent(code), **(files or {})}.items():
        (work / name).parent.mkdir(parents=True, exist_ok=True)
        (work / name).write_text(text)
    output = CollectedOutput()
    started = time.monotonic()
    outcome = await backend.run(replace(spec, workdir=work), sink or output)
    elapsed = time.monotonic() - started
    # By the answer, each process of the run is gone or killed (a zygote's fork is
    # answered before its processes have finished exiting: Box.end_reported) ...
    running = [pid for pid in _run_pids(marker, namespace) if not dying(pid)]
    assert running == [], f"processes of the run still running after it: {running}"
    # ... and gone once the backend's cleanup of the run is over.
    await asyncio.gather(*backend._ending)
    assert marker_pids(marker) == [], "a process of the run survived it"
    if namespace is not None:
        left = {pid: host_status(pid).get("State") for pid in namespace_pids(namespace)}
        assert left == {}, f"processes left in the run's pid namespace: {left}"
    return Ran(outcome, output, work, marker, elapsed)


def _run_pids(marker: str, namespace: int | None) -> list[int]:
    return marker_pids(marker) + (namespace_pids(namespace) if namespace is not None else [])


async def eventually(predicate: Callable[[], T], within: float = 20.0) -> T:
    """Poll ``predicate`` until it returns something truthy (fail after ``within`` s)."""
    with anyio.fail_after(within):
        while True:
            value = predicate()
            if value:
                return value
            await anyio.sleep(0.02)


@contextlib.asynccontextmanager
async def started_harness(settings: Settings, interpreter: Interpreter) -> AsyncIterator[Harness]:
    backend = BwrapBackend(settings, {interpreter.version: interpreter})
    await backend.start()
    harness = Harness(backend, interpreter, settings)
    try:
        yield harness
    finally:
        for work in harness.workspaces:
            await backend.remove_workspace(work)
        await backend.close()


def cgroup_paths(pid: int) -> dict[str, str]:
    """The v1 cgroup ``pid`` is in, per controller (from the host's /proc)."""
    paths = {}
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        for controller in controllers.split(","):
            paths[controller] = path
    return paths


def cgroup_file(pid: int, controller: str, name: str) -> str:
    """A control file of the v1 cgroup ``pid`` is in, read from the host."""
    path = cgroup_paths(pid)[controller]  # (KeyError: not in that hierarchy)
    return Path(f"/sys/fs/cgroup/{controller}{path}/{name}").read_text().strip()
