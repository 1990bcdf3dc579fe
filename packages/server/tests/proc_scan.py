"""Finding a run's host processes by a marker variable in their environment, for tests."""

from __future__ import annotations

import os


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
