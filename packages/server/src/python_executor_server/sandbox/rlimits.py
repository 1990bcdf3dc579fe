"""Resource limits of a run, set by util-linux ``prlimit`` on itself before it execs
the rest of the command line, so bwrap and everything it starts inherit them.

(``prlimit(2)`` on the running sandbox would need CAP_SYS_RESOURCE, which
containers usually drop; lowering one's own limits needs nothing.)

Usage::

    argv = prlimit_argv("/usr/bin/prlimit", limits, address_space=False) + bwrap_argv
"""

from __future__ import annotations

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
