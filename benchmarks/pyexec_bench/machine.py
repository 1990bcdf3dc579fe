"""What the numbers were measured on.

Usage::

    info = machine_info()     # cores, cpu, kernel, ram_mib, os, bwrap, docker, git
"""

from __future__ import annotations

import hashlib
import os
import platform
import shutil
import subprocess
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]


_GIT_STATUS = ["git", "-C", str(REPO), "status", "--porcelain", "--", "."]


def machine_info() -> dict[str, Any]:
    return {
        "cores": os.cpu_count(),
        "cpu": _cpu_model(),
        "kernel": platform.release(),
        "ram_mib": _mem_total_mib(),
        "os": _os_name(),
        "bwrap": _first_line([shutil.which("bwrap") or "bwrap", "--version"]),
        "git_commit": _first_line(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"]),
        # Results of earlier runs (benchmarks/results/) do not make the code dirty.
        "git_dirty": bool(_output([*_GIT_STATUS, ":(exclude)benchmarks/results"])),
        "server_source_sha256": server_source_digest(),
    }


def server_source_digest() -> str:
    """A digest of the server's Python sources: tells runs on a dirty tree apart."""
    digest = hashlib.sha256()
    for path in sorted((REPO / "packages/server/src").rglob("*.py")):
        digest.update(str(path.relative_to(REPO)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


def summary_line(info: dict[str, Any]) -> str:
    return (
        f"{info['cores']} cores, {info['cpu']}, {info['ram_mib'] / 1024:.1f} GiB RAM, "
        f"Linux {info['kernel']}, {info['os']}"
    )


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _mem_total_mib() -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) // 1024
    except OSError:
        pass
    return 0


def _os_name() -> str:
    try:
        for line in Path("/etc/os-release").read_text().splitlines():
            if line.startswith("PRETTY_NAME="):
                return line.split("=", 1)[1].strip('"')
    except OSError:
        pass
    return platform.platform()


def _output(argv: list[str]) -> str:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.SubprocessError):
        return ""
    return done.stdout.strip() if done.returncode == 0 else ""


def _first_line(argv: list[str]) -> str | None:
    out = _output(argv)
    return out.splitlines()[0] if out else None
