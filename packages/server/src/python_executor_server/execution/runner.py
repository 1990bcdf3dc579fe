"""The steps of one run: workspace → files → requirements → sandbox → report.

The runner knows nothing of statuses or stores; it turns a ``Job`` into a
``RunReport`` and always removes what it created: before it returns, or, given
an exit stack, when the caller closes that (the service answers first, then
removes the workspace).

Usage::

    report = await runner.run("exe_...", job, capture)
    async with contextlib.AsyncExitStack() as cleanup:
        report = await runner.run("exe_...", job, capture, cleanup)
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Protocol

import anyio
from python_executor_client.models import ExecutionStatus

from ..errors import ExecutorError, InstallError
from ..sandbox.base import (
    SANDBOX_WORKDIR,
    Interpreter,
    Limits,
    Mount,
    OutputSink,
    RunOutcome,
    RunSpec,
    SandboxBackend,
)
from ..settings import Settings
from . import driver
from .jobs import Job

BASE_ENV = {
    "PATH": "/usr/local/bin:/usr/bin:/bin",
    "HOME": SANDBOX_WORKDIR,
    "LANG": "C.UTF-8",
    "PYTHONUNBUFFERED": "1",
    "PYTHONDONTWRITEBYTECODE": "1",
}


@dataclass(frozen=True)
class RunReport:
    status: ExecutionStatus
    exit_code: int | None = None
    error: str | None = None
    error_type: str | None = None
    error_line: int | None = None
    result: str | None = None
    cpu_ms: int | None = None
    peak_memory_mb: float | None = None


class Environments(Protocol):
    async def prepare(self, job: Job, interpreter: Interpreter) -> tuple[Mount, ...]:
        """Mounts (with sys.path entries as their targets) for the job's requirements."""


class Runner:
    def __init__(
        self,
        settings: Settings,
        backend: SandboxBackend,
        interpreters: Mapping[str, Interpreter],
        environments: Environments | None = None,
    ) -> None:
        self.settings = settings
        self.backend = backend
        self.interpreters = interpreters
        self.environments = environments
        self._kept: dict[str, Path] = {}  # workspaces kept for debugging, until retention

    async def run(
        self,
        execution_id: str,
        job: Job,
        sink: OutputSink,
        cleanup: contextlib.AsyncExitStack | None = None,
    ) -> RunReport:
        """Run ``job``; what it leaves goes when ``cleanup`` closes (or before returning)."""
        if cleanup is None:
            async with contextlib.AsyncExitStack() as own:
                return await self._run(execution_id, job, sink, own)
        return await self._run(execution_id, job, sink, cleanup)

    async def _run(
        self, execution_id: str, job: Job, sink: OutputSink, cleanup: contextlib.AsyncExitStack
    ) -> RunReport:
        interpreter = self._interpreter(job.python_version)
        try:
            mounts = await self._requirements(job, interpreter)
        except InstallError as exc:
            return RunReport(ExecutionStatus.FAILED, error=exc.message)
        planned = self._spec(execution_id, job, interpreter, mounts)
        # The backend may hand out the workspace of a sandbox already started for it.
        workspace = await self.backend.create_workspace(execution_id, job.limits.disk_mb, planned)
        cleanup.push_async_callback(self._leave, execution_id, workspace)
        if job.project_dir is None:  # eval: files capped at max_eval_code_bytes, on tmpfs
            populate_workspace(workspace, job)  # quicker than a thread hop
        else:
            await anyio.to_thread.run_sync(populate_workspace, workspace, job)
        outcome = await self.backend.run(replace(planned, workdir=workspace), sink)
        stderr = getattr(sink, "text", None)
        return interpret_outcome(outcome, job, stderr("stderr") if stderr else "")

    async def _leave(self, execution_id: str, workspace: Path) -> None:
        if self.settings.keep_workdirs:
            self._kept[execution_id] = workspace
        else:
            with anyio.CancelScope(shield=True):
                await self.backend.remove_workspace(workspace)

    def warm(self, job: Job) -> None:
        """Have the backend start sandboxes for runs like ``job`` before the first one."""
        try:
            interpreter = self._interpreter(job.python_version)
        except ExecutorError:
            return
        self.backend.warm(self._spec("exe_warm", job, interpreter, ()))

    async def discard_workspace(self, execution_id: str) -> None:
        """Remove a workspace kept by ``keep_workdirs`` (called by retention)."""
        workspace = self._kept.pop(execution_id, None)
        if workspace is not None:
            await self.backend.remove_workspace(workspace)

    def _interpreter(self, version: str) -> Interpreter:
        found = self.interpreters.get(version)
        if found is not None:
            return found
        # Docker images carry their own interpreter; the backend maps the path.
        return Interpreter(
            version=version, executable=Path("/usr/bin/python3"), prefix=Path("/usr")
        )

    async def _requirements(self, job: Job, interpreter: Interpreter) -> tuple[Mount, ...]:
        if self.environments is None:
            return ()
        return await self.environments.prepare(job, interpreter)

    def _spec(
        self, execution_id: str, job: Job, interpreter: Interpreter, mounts: tuple[Mount, ...]
    ) -> RunSpec:
        """The run, but for its workdir (the backend's ``create_workspace`` gives it)."""
        argv = driver.driver_argv(
            str(interpreter.executable),
            entrypoint=f"{SANDBOX_WORKDIR}/{job.entrypoint}",
            args=job.args,
            eval_last_expr=job.eval_last_expr,
            pre_commands=job.pre_commands,
            result_fd=driver.RESULT_FD,
            extra_paths=[m.target for m in mounts],
        )
        env = {**BASE_ENV, "PATH": f"{interpreter.prefix}/bin:{BASE_ENV['PATH']}", **dict(job.env)}
        return RunSpec(
            execution_id=execution_id,
            workdir=Path(SANDBOX_WORKDIR),  # not yet known
            interpreter=interpreter,
            argv=argv,
            env=env,
            limits=self._limits(job),
            stdin=job.stdin.encode() if job.stdin is not None else None,
            mounts=mounts,
            result_fd=driver.RESULT_FD,
            image=job.image,
            prestart=driver.PRESTART,
        )

    def _limits(self, job: Job) -> Limits:
        return Limits(
            timeout_seconds=job.limits.timeout_seconds,
            memory_mb=job.limits.memory_mb,
            disk_mb=job.limits.disk_mb,
            cpu_shares=job.limits.cpu_shares,
            pids=self.settings.default_pids,
            network=job.limits.network,
            output_cap_bytes=self.settings.output_cap_bytes,
        )


def populate_workspace(workspace: Path, job: Job) -> None:
    """Put the project into the (empty) workspace. Blocking: run in a thread."""
    if job.project_dir is not None:
        shutil.copytree(job.project_dir, workspace, symlinks=True, dirs_exist_ok=True)
    for name, content in job.files:
        if "/" not in name:  # (an eval's main.py: no directory to make, no Path per run)
            with open(os.path.join(workspace, name), "w", encoding="utf-8") as f:
                f.write(content)
            continue
        target = workspace / name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(content, encoding="utf-8")


def _failure(outcome: RunOutcome, job: Job) -> str | None:
    """Why the service stopped (or could not run) the program, if it did."""
    if outcome.error:
        return outcome.error
    if outcome.timed_out:
        return f"timed out after {job.limits.timeout_seconds} s"
    if outcome.oom_killed:
        return (
            f"memory limit exceeded: the program used more than {job.limits.memory_mb} MB "
            "(files it wrote to /work and /tmp count too) and was killed"
        )
    return None


def interpret_outcome(outcome: RunOutcome, job: Job, stderr: str) -> RunReport:
    error = _failure(outcome, job)
    if error is not None:
        return RunReport(
            ExecutionStatus.FAILED,
            exit_code=outcome.exit_code,
            error=error,
            cpu_ms=outcome.cpu_ms,
            peak_memory_mb=outcome.peak_memory_mb,
        )
    report = driver.parse_report(outcome.side_channel)
    error_type, error_line = report.error_type, report.error_line
    failed = outcome.exit_code not in (0, None)
    if failed and error_type is None and report.pre_command_failed is None:
        entrypoint = f"{SANDBOX_WORKDIR}/{job.entrypoint}"
        error_type, error_line = driver.parse_traceback(stderr, entrypoint)
    return RunReport(
        ExecutionStatus.COMPLETED,
        exit_code=outcome.exit_code,
        error_type=error_type if failed else None,
        error_line=error_line if failed else None,
        result=report.result,
        cpu_ms=outcome.cpu_ms,
        peak_memory_mb=outcome.peak_memory_mb,
    )
