"""A reused cgroup slot sees its processes as they are now (cgroups.py keeps a slot's
control files open between runs; not the process list, which v1 would serve stale)."""

from __future__ import annotations

import os
import signal
import subprocess
import uuid

import pytest
from python_executor_server.sandbox.cgroups import detect_cgroups

pytestmark = pytest.mark.sandbox


@pytest.mark.timeout(30)
async def test_a_slot_sees_and_kills_a_process_that_joined_just_after_a_look(
    sandbox_prerequisites: None,
) -> None:
    cgroups = detect_cgroups(f"pyexec-test-{uuid.uuid4().hex[:8]}", f"{os.getpid()}-test")
    assert cgroups is not None, "no usable cgroups here"
    try:
        slot = await cgroups.acquire()
        for _ in range(3):  # the same slot, again and again, as runs reuse it
            assert slot.pids() == []  # a look: v1 would keep this list for an open file
            sleeper = subprocess.Popen(["sleep", "30"])  # noqa: ASYNC220 - instant
            try:
                slot.add(sleeper.pid)
                assert slot.pids() == [sleeper.pid]
                slot.signal_all(signal.SIGKILL)
                assert sleeper.wait(timeout=5) == -signal.SIGKILL
            finally:
                sleeper.kill()
                sleeper.wait()
            cgroups.release(slot)
            slot = await cgroups.acquire()
    finally:
        cgroups.close()
