"""The backend's own lifecycle: start-up reaping, cgroup reuse, work dirs, clean close."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
from bwrap_harness import Harness, started_harness
from python_executor_server.sandbox.base import Interpreter
from python_executor_server.sandbox.cgroups import v1_mounts
from python_executor_server.sandbox.mounts import bind_readonly, mount_points_under
from python_executor_server.settings import Settings

pytestmark = pytest.mark.sandbox


def _dead_pid() -> int:
    pid = 4_000_000
    while Path(f"/proc/{pid}").exists():
        pid += 1
    return pid


@pytest.mark.timeout(60)
async def test_start_reaps_what_a_crashed_server_left(
    sandbox_settings: Settings, interpreter: Interpreter, tmp_path: Path
) -> None:
    mounts = v1_mounts()
    if "memory" not in mounts:
        pytest.skip("this host has no v1 memory hierarchy (the v2 layout is the same)")
    stale = f"{_dead_pid()}-deadbeef"
    victim = subprocess.Popen(["sleep", "600"])  # noqa: ASYNC220 - a plain host process
    slot_dirs = []
    for controller in ("memory", "pids"):
        slot = mounts[controller] / sandbox_settings.cgroup_root / stale / "s1"
        slot.mkdir(parents=True)
        (slot / "cgroup.procs").write_text(str(victim.pid))
        slot_dirs.append(slot)
    source = tmp_path / "interpreter"
    source.mkdir()
    (source / "keep.txt").write_text("must survive")
    alias = sandbox_settings.runs_path / ".sandbox" / stale / "hosts" / "0"
    alias.mkdir(parents=True)
    bind_readonly(source, alias)
    try:
        async with started_harness(sandbox_settings, interpreter):
            assert victim.wait(timeout=5) == -9  # killed by the new server's start()
            assert not any(d.exists() for d in slot_dirs)
            assert not alias.parent.parent.exists()
            assert mount_points_under(alias.parent.parent) == []
    finally:
        victim.kill()
        victim.wait()
    assert (source / "keep.txt").read_text() == "must survive"


@pytest.mark.timeout(60)
async def test_close_leaves_no_mount_and_no_cgroup(
    sandbox_settings: Settings, interpreter: Interpreter
) -> None:
    async with started_harness(sandbox_settings, interpreter) as harness:
        ran = await harness.run("print('x')")
        assert ran.outcome.exit_code == 0
        instance = harness.backend._instance
    assert mount_points_under(sandbox_settings.runs_path) == []
    for point in v1_mounts().values():
        assert not (point / sandbox_settings.cgroup_root / instance).exists()


@pytest.mark.timeout(60)
async def test_cgroups_are_reused_across_runs(sandbox: Harness) -> None:
    for _ in range(5):
        assert (await sandbox.run("pass")).outcome.exit_code == 0
    memory = v1_mounts().get("memory")
    if memory is None:
        pytest.skip("cgroup v2: one cgroup per run by design")
    slots = list((memory / sandbox.settings.cgroup_root / sandbox.backend._instance).iterdir())
    assert len([s for s in slots if s.is_dir()]) == 1


@pytest.mark.timeout(60)
async def test_kept_files_charged_to_a_cgroup_do_not_eat_the_next_runs_memory(
    sandbox: Harness,
) -> None:
    # tmpfs pages stay charged to the cgroup that wrote them while the files
    # exist; a reused cgroup holding them must not be handed to the next run.
    first = await sandbox.run(
        "with open('/work/kept.bin', 'wb') as f:\n"
        "    for _ in range(40): f.write(b'k' * 1024 * 1024)\n",
        memory_mb=64,
        disk_mb=64,
    )
    assert first.outcome.exit_code == 0 and (first.workdir / "kept.bin").exists()
    second = await sandbox.run(
        "block = bytearray(40 * 1024 * 1024); print('ok')", memory_mb=64, disk_mb=64
    )
    assert second.outcome.exit_code == 0 and not second.outcome.oom_killed, second.stderr
    assert second.outcome.peak_memory_mb is not None and second.outcome.peak_memory_mb < 60


@pytest.mark.timeout(60)
async def test_removing_a_busy_workspace_detaches_it(sandbox: Harness) -> None:
    work = await sandbox.workspace({"main.py": "print(1)"})
    holder = open(work / "main.py")  # noqa: SIM115, ASYNC230 - keeps the tmpfs busy
    try:
        await sandbox.backend.remove_workspace(work)
        assert not work.parent.exists()
        assert holder.read() == "print(1)"
    finally:
        holder.close()
    assert mount_points_under(sandbox.settings.runs_path) == [] or all(
        ".sandbox" in str(p) for p in mount_points_under(sandbox.settings.runs_path)
    )


@pytest.mark.timeout(60)
async def test_workspace_refuses_paths_it_did_not_make(sandbox: Harness, tmp_path: Path) -> None:
    from python_executor_server.errors import SandboxError

    victim = tmp_path / "work"
    victim.mkdir()
    with pytest.raises(SandboxError):
        await sandbox.backend.remove_workspace(victim)
    assert victim.exists()
    with pytest.raises(SandboxError):
        await sandbox.backend.create_workspace("../escape", 8)


@pytest.mark.timeout(60)
async def test_files_written_by_root_are_given_to_the_sandbox_user(sandbox: Harness) -> None:
    ran = await sandbox.run(
        """
        import os
        os.makedirs('/work/pkg/sub', exist_ok=True)
        open('/work/pkg/sub/new.txt', 'w').write('ok')
        open('/work/pkg/data.txt', 'a').write('appended')
        print(os.stat('/work/pkg/data.txt').st_uid)
        """,
        files={"pkg/data.txt": "from root:"},
    )
    assert ran.outcome.exit_code == 0, ran.stderr
    assert ran.stdout == "1000\n"
    assert (ran.workdir / "pkg/data.txt").read_text() == "from root:appended"


@pytest.mark.timeout(60)
async def test_interpreter_prefix_is_bound_through_an_alias(sandbox: Harness) -> None:
    prefix = sandbox.interpreter.prefix
    if str(prefix).startswith("/usr"):
        pytest.skip("a system interpreter needs no alias")
    points = mount_points_under(sandbox.settings.runs_path / ".sandbox")
    assert points, "the unreachable prefix is aliased at start"
    assert os.stat(points[0]).st_ino == os.stat(prefix).st_ino
    with pytest.raises(OSError):
        (points[0] / "evil").write_text("x")  # read-only on the host too
