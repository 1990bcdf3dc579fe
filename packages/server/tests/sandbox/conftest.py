"""Fixtures of the real-sandbox suite: a started ``BwrapBackend`` on throwaway paths
and cgroups, and the ``sandbox`` harness (bwrap_harness.py).

These tests need root (cgroups, tmpfs work dirs, the sandbox uid) and
bubblewrap. In CI (``CI`` set) a missing prerequisite fails instead of skipping.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from bwrap_harness import Harness, started_harness
from python_executor_server.execution.interpreters import default_version, discover_interpreters
from python_executor_server.sandbox.base import Interpreter
from python_executor_server.sandbox.bwrap import BwrapBackend
from python_executor_server.sandbox.mounts import mount_points_under, unmount
from python_executor_server.settings import Settings


def _missing_prerequisite() -> str | None:
    if os.geteuid() != 0:
        return "the bwrap sandbox suite needs root (cgroups, tmpfs work dirs, uid 1000)"
    if shutil.which("bwrap") is None:
        return "bubblewrap (bwrap) is not installed"
    return None


@pytest.fixture(scope="session")
def sandbox_prerequisites() -> None:
    reason = _missing_prerequisite()
    if reason is None:
        return
    if os.environ.get("CI"):
        pytest.fail(f"sandbox tests must run in CI: {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="session")
def interpreter(sandbox_prerequisites: None) -> Interpreter:
    settings = Settings()
    found = discover_interpreters(settings)
    return found[default_version(settings, found)]


@pytest.fixture()
def sandbox_settings(sandbox_prerequisites: None) -> Iterator[Settings]:
    # Not under pytest's tmp_path: /tmp/pytest-of-root is 0700, the sandbox uid
    # could not reach its work dirs there.
    run_dir = Path(tempfile.mkdtemp(prefix="pyexec-sandbox-test-", dir="/tmp"))
    os.chmod(run_dir, 0o711)
    yield Settings(
        run_dir=run_dir,
        data_dir=run_dir / "data",
        cgroup_root=f"pyexec-test-{os.getpid()}",
        max_archive_entries=1000,
    )
    for point in mount_points_under(run_dir):
        unmount(point)
    if not mount_points_under(run_dir):
        shutil.rmtree(run_dir, ignore_errors=True)


@pytest.fixture()
async def sandbox(sandbox_settings: Settings, interpreter: Interpreter) -> AsyncIterator[Harness]:
    async with started_harness(sandbox_settings, interpreter) as harness:
        yield harness


@pytest.fixture()
async def backend(sandbox: Harness) -> BwrapBackend:
    return sandbox.backend


@pytest.fixture(params=[True, False], ids=["seccomp", "no-seccomp"])
async def sandbox_either_seccomp(
    request: pytest.FixtureRequest, sandbox_settings: Settings, interpreter: Interpreter
) -> AsyncIterator[Harness]:
    """With and without the filter: proves namespaces, cgroups and rlimits hold alone."""
    settings = sandbox_settings.model_copy(update={"seccomp": request.param})
    async with started_harness(settings, interpreter) as harness:
        assert harness.backend.describe()["seccomp"] is request.param
        yield harness
