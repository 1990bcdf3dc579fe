"""Requirement environments built by real uv installs from the package index (PyPI).

The installer runs as a host process here (``install_isolation="host"``);
``test_environments_backend.py`` runs it through the sandbox backend. Cache
hits are observed as the installer not being started: ``CountingInstaller``
wraps the real one and records every start.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import cast

import anyio
import pytest
from python_executor_server.errors import InstallError
from python_executor_server.execution.environments import (
    LAST_USED,
    META,
    SITE_PACKAGES,
    EnvironmentCache,
)
from python_executor_server.execution.installer import (
    HostInstaller,
    Installer,
    InstallJob,
    InstallResult,
)
from python_executor_server.execution.interpreters import default_version, discover_interpreters
from python_executor_server.execution.jobs import Job, JobLimits
from python_executor_server.sandbox.base import Interpreter, SandboxBackend
from python_executor_server.settings import Settings

PYPI = "https://pypi.org/simple"

pytestmark = [pytest.mark.sandbox, pytest.mark.timeout(300)]


class CountingInstaller:
    """The real installer, recording every start."""

    def __init__(self, inner: Installer) -> None:
        self.inner = inner
        self.jobs: list[InstallJob] = []

    async def install(self, job: InstallJob) -> InstallResult:
        self.jobs.append(job)
        return await self.inner.install(job)


@pytest.fixture(scope="module")
def interpreters() -> dict[str, Interpreter]:
    found = discover_interpreters(Settings())
    if not found:
        pytest.skip("no Python 3.10+ interpreter on this machine")
    return found


@pytest.fixture(scope="module")
def interp(interpreters: dict[str, Interpreter]) -> Interpreter:
    return interpreters[default_version(Settings(), interpreters)]


@pytest.fixture
def data_dir() -> Iterator[Path]:
    # not tmp_path: /tmp/pytest-of-root is 0700, and environments must be reachable
    path = Path(tempfile.mkdtemp(prefix="pyexec-envs-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def settings_for(data_dir: Path, **overrides: object) -> Settings:
    values: dict[str, object] = {
        "data_dir": data_dir,
        "index_url": PYPI,
        "install_isolation": "host",
    }
    values.update(overrides)
    return Settings(**values)  # type: ignore[arg-type]


def cache_for(settings: Settings) -> tuple[EnvironmentCache, CountingInstaller]:
    counting = CountingInstaller(HostInstaller())
    return EnvironmentCache(settings, cast(SandboxBackend, None), installer=counting), counting


async def run_python(interp: Interpreter, entries: Sequence[str], code: str) -> str:
    """``code`` under ``python -I`` with ``entries`` prepended to sys.path, as the driver does."""
    prelude = f"import sys; sys.path[:0] = {list(entries)!r}\n"
    with anyio.fail_after(60):
        done = await anyio.run_process(
            [str(interp.executable), "-I", "-c", prelude + code], check=False
        )
    assert done.returncode == 0, done.stderr.decode()
    return done.stdout.decode().strip()


def leftovers(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if p.name.startswith((".staging-", ".trash-")))


async def test_six_installs_and_imports_with_the_target_interpreter(
    data_dir: Path, interp: Interpreter
) -> None:
    cache, counting = cache_for(settings_for(data_dir))
    env = await cache.ensure(interp, ["six==1.17.0"])

    assert env.parent == data_dir / "envs" and (env / META).is_file()
    out = await run_python(
        interp, cache.sys_path_entries(env), "import six; print(six.__version__, six.__file__)"
    )
    assert out == f"1.17.0 {env / SITE_PACKAGES / 'six.py'}"
    tag = f"cpython-{interp.version.replace('.', '')}"
    assert (env / SITE_PACKAGES / "__pycache__" / f"six.{tag}.pyc").is_file()  # precompiled
    assert not (env / SITE_PACKAGES / ".lock").exists()
    assert [m.target for m in cache.mounts(env)] == list(cache.sys_path_entries(env))
    assert all(not m.writable for m in cache.mounts(env))
    assert leftovers(data_dir / "envs") == []
    assert len(counting.jobs) == 1 and "six==1.17.0" in counting.jobs[0].argv


async def test_the_env_works_read_only(data_dir: Path, interp: Interpreter) -> None:
    cache, _ = cache_for(settings_for(data_dir))
    env = await cache.ensure(interp, ["colorama==0.4.6"])
    await anyio.run_process(["chmod", "-R", "a-w", str(env)])
    try:
        out = await run_python(interp, cache.sys_path_entries(env), "import colorama; print('ok')")
        assert out == "ok"
    finally:
        await anyio.run_process(["chmod", "-R", "u+w", str(env)])


async def test_second_ensure_is_a_cache_hit(data_dir: Path, interp: Interpreter) -> None:
    settings = settings_for(data_dir)
    cache, counting = cache_for(settings)
    env = await cache.ensure(interp, ["six==1.17.0"])
    inode = env.stat().st_ino
    os.utime(env / LAST_USED, (1, 1))

    started = time.perf_counter()
    again = await cache.ensure(interp, ["Six == 1.17.0", "six==1.17.0"])
    elapsed = time.perf_counter() - started

    assert again == env and env.stat().st_ino == inode
    assert len(counting.jobs) == 1  # the installer was not started again
    assert elapsed < 0.05
    assert (env / LAST_USED).stat().st_mtime > time.time() - 60  # marked used

    restarted, counting_after_restart = cache_for(settings)  # a new server process
    assert await restarted.ensure(interp, ["six==1.17.0"]) == env
    assert counting_after_restart.jobs == []


async def test_concurrent_same_key_ensures_install_once(
    data_dir: Path, interp: Interpreter
) -> None:
    settings = settings_for(data_dir)
    # two caches over one directory: two server processes (only the file lock is shared)
    first, first_count = cache_for(settings)
    second, second_count = cache_for(settings)
    results: list[Path] = []

    async def ensure(cache: EnvironmentCache) -> None:
        results.append(await cache.ensure(interp, ["colorama==0.4.6", "six==1.17.0"]))

    async with anyio.create_task_group() as tg:
        for cache in (first, second, first, second, first, second):
            tg.start_soon(ensure, cache)

    assert len(first_count.jobs) + len(second_count.jobs) == 1
    assert len(results) == 6 and len(set(results)) == 1
    assert leftovers(data_dir / "envs") == []


async def test_a_nonexistent_package_fails_naming_it(data_dir: Path, interp: Interpreter) -> None:
    cache, counting = cache_for(settings_for(data_dir))
    missing = f"pyexec-no-such-package-{uuid.uuid4().hex[:12]}"

    with pytest.raises(InstallError) as caught:
        await cache.ensure(interp, ["six", missing])
    assert missing in caught.value.message
    assert "not found" in caught.value.message  # the installer's own words

    envs = data_dir / "envs"
    assert leftovers(envs) == []
    assert [p for p in envs.iterdir() if not p.name.startswith(".")] == []
    # a repeated request gets the same answer at once, without a second install
    with pytest.raises(InstallError, match=missing):
        await cache.ensure(interp, [missing, "six"])
    assert len(counting.jobs) == 1


async def test_every_interpreter_gets_its_own_env(
    data_dir: Path, interpreters: dict[str, Interpreter]
) -> None:
    cache, counting = cache_for(settings_for(data_dir))
    envs = {v: await cache.ensure(i, ["six==1.17.0"]) for v, i in interpreters.items()}

    assert len(set(envs.values())) == len(interpreters) == len(counting.jobs)
    for version, env in envs.items():
        code = "import sys, six; print('%d.%d' % sys.version_info[:2], six.__file__)"
        out = await run_python(interpreters[version], cache.sys_path_entries(env), code)
        assert out == f"{version} {env / SITE_PACKAGES / 'six.py'}"


async def test_a_new_combination_of_seen_packages_installs_offline(
    data_dir: Path, interp: Interpreter
) -> None:
    online, _ = cache_for(settings_for(data_dir))
    await online.ensure(interp, ["six==1.17.0"])
    await online.ensure(interp, ["colorama==0.4.6"])

    offline, counting = cache_for(settings_for(data_dir, offline_installs=True))
    env = await offline.ensure(interp, ["colorama==0.4.6", "six==1.17.0"])
    assert "--offline" in counting.jobs[0].argv
    entries = offline.sys_path_entries(env)
    assert await run_python(interp, entries, "import six, colorama; print(1)") == "1"

    with pytest.raises(InstallError, match="pyyaml"):
        await offline.ensure(interp, ["PyYAML==6.0.2"])  # never downloaded: offline cannot


async def test_prepare_installs_explicit_and_detected_requirements(
    data_dir: Path, interp: Interpreter
) -> None:
    cache, counting = cache_for(settings_for(data_dir))
    job = eval_job(interp, "import yaml, six\n", requirements_txt="six==1.17.0")
    mounts = await cache.prepare(job, interp)

    entries = [m.target for m in mounts]
    assert await run_python(interp, entries, "import yaml, six; print(six.__version__)") == "1.17.0"
    assert [j.argv[-2:] for j in counting.jobs] == [("pyyaml", "six==1.17.0")]

    assert await cache.prepare(eval_job(interp, "import os\n"), interp) == ()
    off = eval_job(interp, "import yaml\n", requirements_txt=None, auto_detect=False)
    assert await cache.prepare(off, interp) == ()


async def test_detected_imports_that_cannot_install_never_fail_the_run(
    data_dir: Path, interp: Interpreter
) -> None:
    online, _ = cache_for(settings_for(data_dir))
    await online.ensure(interp, ["six==1.17.0"])
    # offline, PyYAML (detected from `import yaml`) cannot be installed: explicit six still is
    offline, counting = cache_for(settings_for(data_dir, offline_installs=True))
    job = eval_job(interp, "import yaml\nimport six\n", requirements_txt="six==1.17.0")
    mounts = await offline.prepare(job, interp)

    assert await run_python(interp, [m.target for m in mounts], "import six; print(2)") == "2"
    assert [j.argv[-2:] for j in counting.jobs] == [("pyyaml", "six==1.17.0")]  # then a hit
    only_detected = eval_job(interp, "import yaml\n", requirements_txt=None)
    assert await offline.prepare(only_detected, interp) == ()
    with pytest.raises(InstallError):  # what was asked for explicitly does fail the run
        await offline.prepare(eval_job(interp, "", requirements_txt="PyYAML"), interp)


async def test_least_recently_used_envs_are_evicted_but_recent_ones_kept(
    data_dir: Path, interp: Interpreter
) -> None:
    cache, _ = cache_for(settings_for(data_dir))
    older = await cache.ensure(interp, ["six==1.17.0"])
    old = await cache.ensure(interp, ["colorama==0.4.6"])
    recent = await cache.ensure(interp, ["colorama==0.4.6", "six==1.17.0"])
    hour = 3600
    os.utime(older / LAST_USED, (time.time() - 3 * hour,) * 2)
    os.utime(old / LAST_USED, (time.time() - 2 * hour,) * 2)

    small = EnvironmentCache(
        settings_for(data_dir, envs_max_mb=0, max_timeout=hour),
        cast(SandboxBackend, None),
        installer=HostInstaller(),
    )
    removed = await anyio.to_thread.run_sync(small.evict)

    assert removed == [older.name, old.name]  # oldest first
    assert not older.exists() and not old.exists()
    assert recent.is_dir()  # used within max_timeout: a run may have it mounted
    assert sorted(p.name for p in (data_dir / "envs" / ".locks").iterdir()) == [
        f"{recent.name}.lock"
    ]
    assert leftovers(data_dir / "envs") == []


async def test_an_install_evicts_what_no_longer_fits(data_dir: Path, interp: Interpreter) -> None:
    cache, counting = cache_for(settings_for(data_dir, envs_max_mb=0, max_timeout=60))
    first = await cache.ensure(interp, ["six==1.17.0"])
    assert first.is_dir()  # the one just installed is never evicted
    os.utime(first / LAST_USED, (time.time() - 120,) * 2)

    second = await cache.ensure(interp, ["colorama==0.4.6"])
    assert second.is_dir() and not first.exists()
    assert await cache.ensure(interp, ["six==1.17.0"]) == first  # rebuilt on demand
    assert len(counting.jobs) == 3


def eval_job(
    interp: Interpreter,
    code: str,
    *,
    requirements_txt: str | None = None,
    auto_detect: bool = True,
) -> Job:
    return Job(
        kind="eval",
        entrypoint="main.py",
        python_version=interp.version,
        limits=JobLimits(
            timeout_seconds=30, memory_mb=512, disk_mb=512, cpu_shares=1024, network=False
        ),
        files=(("main.py", code),),
        requirements_txt=requirements_txt,
        auto_detect=auto_detect,
    )
