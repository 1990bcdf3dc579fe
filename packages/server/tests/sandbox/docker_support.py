"""Helpers for the Docker backend's tests (imported directly; the fixtures are in
``conftest_docker.py``)."""

from __future__ import annotations

import dataclasses
import os
import time
import uuid
from pathlib import Path
from typing import Any, NoReturn

import pytest
from python_executor_server.sandbox.base import CollectedOutput, Interpreter, Limits, RunSpec
from python_executor_server.sandbox.docker import DockerBackend, default_limits
from python_executor_server.sandbox.docker_pool import LABEL, LABEL_INSTANCE
from python_executor_server.settings import Settings

HOST_PYTHON = Path("/usr/bin/python3")  # mapped to the image's python3 by the backend
IMAGE = "python-executor-sandbox:latest"
INSTANCE = f"tests-{uuid.uuid4().hex[:8]}"  # our containers only: a dev server may share the daemon


def unavailable(reason: str) -> NoReturn:
    if os.environ.get("CI") == "true":
        pytest.fail(f"Docker tests must run in CI: {reason}")
    pytest.skip(reason)


def our_containers(api: Any, execution_id: str | None = None) -> list[dict[str, Any]]:
    labels = [f"{LABEL}=1", f"{LABEL_INSTANCE}={INSTANCE}"]
    if execution_id is not None:
        labels.append(f"python-executor.execution={execution_id}")
    return list(api.containers(all=True, filters={"label": labels}))


def wait_gone(
    api: Any, execution_id: str | None = None, timeout: float = 30
) -> list[dict[str, Any]]:
    """Our containers still there after ``timeout`` (auto-removal is asynchronous: dockerd
    once took over 10 s to finish removing one, "Removal In Progress", under CI load)."""
    deadline = time.monotonic() + timeout
    while (left := our_containers(api, execution_id)) and time.monotonic() < deadline:
        time.sleep(0.1)
    return left


def docker_settings(tmp_path: Path, **overrides: Any) -> Settings:
    return Settings(
        run_dir=tmp_path / "runs",
        data_dir=tmp_path / "data",
        docker_instance=INSTANCE,
        default_image=IMAGE,
        **{"docker_pool_size": 0, **overrides},
    )


async def make_spec(
    backend: DockerBackend,
    code: str,
    *,
    argv: tuple[str, ...] | None = None,
    env: dict[str, str] | None = None,
    stdin: bytes | None = None,
    result_fd: int | None = None,
    files: dict[str, str] | None = None,
    **limits: Any,
) -> RunSpec:
    """A run of ``code`` as main.py in a fresh workspace, default limits unless given."""
    execution_id = f"exe_{uuid.uuid4()}"
    workdir = await backend.create_workspace(execution_id, 64)
    for name, text in {"main.py": code, **(files or {})}.items():
        (workdir / name).parent.mkdir(parents=True, exist_ok=True)
        (workdir / name).write_text(text)
    base: Limits = default_limits(backend._settings)
    return RunSpec(
        execution_id=execution_id,
        workdir=workdir,
        interpreter=Interpreter("3.11", HOST_PYTHON, Path("/usr")),
        argv=argv or (str(HOST_PYTHON), "main.py"),
        env=env if env is not None else {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"},
        limits=dataclasses.replace(base, **limits),
        stdin=stdin,
        result_fd=result_fd,
    )


async def run(
    backend: DockerBackend, spec: RunSpec, cap: int = 8 << 20
) -> tuple[Any, CollectedOutput]:
    sink = CollectedOutput(cap=cap)
    outcome = await backend.run(spec, sink)
    return outcome, sink
