"""Names of server instances, so one server can clean up after another that died.

Per-instance state (cgroups, alias mounts) lives in directories named
``<pid>-<random>``; when no process has that pid any more, its owner is gone.

Usage::

    name = new_instance_name()                 # "4242-9f3a1c2b"
    for d in stale_instances(parent): ...      # left by servers that died
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path


def new_instance_name() -> str:
    return f"{os.getpid()}-{secrets.token_hex(4)}"


def stale_instances(parent: Path) -> list[Path]:
    """Directories ``parent/<pid>-*`` whose pid no longer exists."""
    if not parent.is_dir():
        return []
    stale = []
    for d in parent.iterdir():
        owner = d.name.split("-", 1)[0]
        if d.is_dir() and owner.isdigit() and not Path(f"/proc/{owner}").exists():
            stale.append(d)
    return stale
