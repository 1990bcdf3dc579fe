"""Finding a run's host processes by a marker variable in their environment, and telling
whether one is dying, for tests."""

from __future__ import annotations

import os
import signal


def pids_with_env(name: str, value: str) -> list[int]:
    """Host pids whose environment has ``name=value`` (zombies have none: not counted)."""
    needle = f"{name}={value}".encode()
    found = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/environ", "rb") as f:
                if needle in f.read():
                    found.append(int(entry.name))
        except OSError:
            continue
    return found


_SIGKILL_BIT = 1 << (signal.SIGKILL - 1)
_PF_EXITING = 0x4


def dying(pid: int) -> bool:
    """``pid`` runs no more code of its own: gone, a zombie, exiting, or SIGKILL pending."""
    try:
        with open(f"/proc/{pid}/status") as f:
            status = dict(line.rstrip("\n").split(":\t", 1) for line in f if ":\t" in line)
        with open(f"/proc/{pid}/stat") as f:
            flags = int(f.read().rsplit(")", 1)[1].split()[6])
    except (OSError, IndexError, ValueError):
        return True  # gone meanwhile
    pending = int(status.get("SigPnd", "0"), 16) | int(status.get("ShdPnd", "0"), 16)
    exiting = flags & _PF_EXITING or pending & _SIGKILL_BIT
    return status.get("State", "Z")[0] in "ZX" or bool(exiting)
