"""Environments installed inside the real bwrap sandbox, then used read-only by a sandboxed run.

The installer runs through ``SandboxInstaller`` (network on, only the staging
dir and the uv cache writable) and the program through the same backend with
the environment mounted read-only, as the runner does.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from python_executor_server.errors import InstallError
from python_executor_server.execution.environments import EnvironmentCache
from python_executor_server.execution.installer import InstallJob, SandboxInstaller
from python_executor_server.execution.interpreters import default_version, discover_interpreters
from python_executor_server.sandbox.base import (
    CollectedOutput,
    Interpreter,
    Limits,
    Mount,
    RunSpec,
    SandboxBackend,
)
from python_executor_server.settings import Settings

PYPI = "https://pypi.org/simple"

pytestmark = [
    pytest.mark.sandbox,
    pytest.mark.timeout(300),
    pytest.mark.skipif(os.geteuid() != 0, reason="the bwrap backend runs as uid 1000: needs root"),
    pytest.mark.skipif(shutil.which("bwrap") is None, reason="bubblewrap is not installed"),
]


@pytest.fixture(scope="module")
def interp() -> Interpreter:
    found = discover_interpreters(Settings())
    if not found:
        pytest.skip("no Python 3.10+ interpreter on this machine")
    return found[default_version(Settings(), found)]


@pytest.fixture
def settings() -> Iterator[Settings]:
    data = Path(tempfile.mkdtemp(prefix="pyexec-envs-"))
    data.chmod(0o755)
    yield Settings(data_dir=data, index_url=PYPI, install_isolation="sandbox")
    shutil.rmtree(data, ignore_errors=True)


@pytest.fixture
async def backend(settings: Settings) -> AsyncIterator[SandboxBackend]:
    from python_executor_server.sandbox.bwrap import BwrapBackend

    instance = BwrapBackend(settings)
    await instance.start()
    try:
        yield instance
    finally:
        await instance.close()


async def run_in_sandbox(
    backend: SandboxBackend, interp: Interpreter, mounts: tuple[Mount, ...], code: str
) -> tuple[int | None, str]:
    workdir = await backend.create_workspace(f"exe_{uuid.uuid4()}", 64)
    try:
        prelude = f"import sys; sys.path[:0] = {[m.target for m in mounts]!r}\n"
        spec = RunSpec(
            execution_id=workdir.parent.name,
            workdir=workdir,
            interpreter=interp,
            argv=(str(interp.executable), "-I", "-c", prelude + code),
            env={"PATH": "/usr/bin:/bin", "HOME": "/work", "PYTHONDONTWRITEBYTECODE": "1"},
            limits=Limits(
                timeout_seconds=60,
                memory_mb=512,
                disk_mb=64,
                cpu_shares=1024,
                pids=64,
                network=False,
                output_cap_bytes=1 << 20,
            ),
            mounts=mounts,
        )
        sink = CollectedOutput()
        outcome = await backend.run(spec, sink)
        assert outcome.error is None, outcome.error
        return outcome.exit_code, sink.text("stdout") + sink.text("stderr")
    finally:
        await backend.remove_workspace(workdir)


async def test_install_in_the_sandbox_then_import_read_only_in_a_run(
    settings: Settings, backend: SandboxBackend, interp: Interpreter
) -> None:
    cache = EnvironmentCache(settings, backend)
    assert isinstance(cache.installer, SandboxInstaller)
    env = await cache.ensure(interp, ["six==1.17.0"])

    # what the sandboxed installer wrote belongs to the server again, not to uid 1000
    assert all(p.stat().st_uid == os.getuid() for p in env.rglob("*"))
    code = (
        "import six; print(six.__version__)\n"
        "try:\n    open(six.__file__ + '.x', 'w')\n"
        "except OSError as e:\n    print(type(e).__name__)\n"
    )
    exit_code, output = await run_in_sandbox(backend, interp, cache.mounts(env), code)
    assert exit_code == 0, output
    assert output.split() == ["1.17.0", "OSError"]  # importable, and read-only


async def test_a_nonexistent_package_fails_in_the_sandbox_naming_it(
    settings: Settings, backend: SandboxBackend, interp: Interpreter
) -> None:
    cache = EnvironmentCache(settings, backend)
    missing = f"pyexec-no-such-package-{uuid.uuid4().hex[:12]}"
    with pytest.raises(InstallError, match=missing):
        await cache.ensure(interp, [missing])


async def test_the_install_sandbox_can_write_its_target_and_nothing_else(
    settings: Settings, backend: SandboxBackend, interp: Interpreter
) -> None:
    staging = settings.data_dir / "staging"
    staging.mkdir()
    os.chown(staging, settings.sandbox_host_uid, settings.sandbox_host_uid)
    outside = settings.data_dir / "outside"
    outside.mkdir(mode=0o777)
    outside.chmod(0o777)  # even a world-writable host dir is out of reach
    # (paths under /tmp exist inside too, but there /tmp is the run's private tmpfs)
    script = (
        f"echo ok > {staging}/target-file; "
        f"echo x > {outside}/escaped; "
        f"echo x > {settings.data_dir}/escaped; "
        "echo x > /usr/escaped; "
        "exit 0"
    )
    job = InstallJob(
        key="t" * 64,
        argv=("/bin/sh", "-c", script),
        env={"PATH": "/usr/bin:/bin", "HOME": "/work"},
        interpreter=interp,
        writable=(staging,),
        readable=(),
        timeout=30,
    )
    result = await SandboxInstaller(settings, backend).install(job)

    assert result.ok, result.output
    assert "/usr/escaped: Read-only file system" in result.output
    assert (staging / "target-file").read_text() == "ok\n"
    assert not (outside / "escaped").exists() and not (settings.data_dir / "escaped").exists()
