"""Resource limits of a run: set with ``prlimit(2)`` on bwrap's namespace init before
it starts the command (which inherits them), or, where the server may not change
another process's limits (root without CAP_SYS_RESOURCE, as containers usually run
it), by util-linux ``prlimit`` on itself before it execs the rest of the command line
(lowering one's own limits needs nothing).

Usage::

    for which, value in rlimits_for(limits, address_space=False).items(): ...
    argv = prlimit_argv("/usr/bin/prlimit", limits, address_space=False) + bwrap_argv
    may_limit_others()      # False: use prlimit_argv
"""

from __future__ import annotations

import os
import resource

from .base import Limits

MIB = 1024 * 1024
_OPTIONS = {
    resource.RLIMIT_NOFILE: "--nofile",
    resource.RLIMIT_CORE: "--core",
    resource.RLIMIT_FSIZE: "--fsize",
    resource.RLIMIT_AS: "--as",
}


def rlimits_for(limits: Limits, *, address_space: bool) -> dict[int, int]:
    """``RLIMIT_*`` -> value (soft = hard). ``address_space``: the RLIMIT_AS fallback
    for hosts without a memory cgroup (it caps each process, not the tree)."""
    file_size_mb = limits.file_size_mb if limits.file_size_mb is not None else limits.disk_mb
    values = {
        resource.RLIMIT_NOFILE: limits.open_files,
        resource.RLIMIT_CORE: 0,
        resource.RLIMIT_FSIZE: file_size_mb * MIB,
    }
    if address_space:
        values[resource.RLIMIT_AS] = limits.memory_mb * MIB
    return values


def prlimit_argv(prlimit: str, limits: Limits, *, address_space: bool) -> list[str]:
    argv = [prlimit]
    for which, value in rlimits_for(limits, address_space=address_space).items():
        _, hard = resource.getrlimit(which)
        if hard != resource.RLIM_INFINITY:  # raising a hard limit needs privilege
            value = min(value, hard)
        argv.append(f"{_OPTIONS[which]}={value}:{value}")
    return [*argv, "--"]


CAP_SYS_RESOURCE = 24


def may_limit_others() -> bool:
    """Whether ``prlimit(2)`` on a sandbox's processes will work: as their owner (not
    root), or with CAP_SYS_RESOURCE."""
    if os.geteuid() != 0:
        return True
    try:
        with open("/proc/self/status") as f:
            caps = next(line.split()[1] for line in f if line.startswith("CapEff:"))
    except (OSError, StopIteration, IndexError):
        return False
    return bool(int(caps, 16) >> CAP_SYS_RESOURCE & 1)
