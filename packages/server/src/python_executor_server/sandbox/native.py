"""The zygote's native part (``zygote_native.c``), built with the host's C compiler.

Built once per source and compiler and kept in the user's cache directory
(``$XDG_CACHE_HOME/python-executor``, else ``~/.cache/python-executor``), in a directory
only its owner can write: a cached library is used only when it and its directory are
ours and writable by nobody else (the zygote runs it). Where that cannot be had, it is
built in a temporary directory for this process alone. The zygote gets the library as
a memfd (``zygote.py``): nothing is mounted into its sandbox for it. Without a C
compiler there is none, and the pool starts its sandboxes with bwrap instead
(``Zygotes`` says so once in the log).

Usage::

    library = native_library()   # the built shared object's bytes, or None
"""

from __future__ import annotations

import functools
import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import structlog

log = structlog.get_logger("python_executor.sandbox.native")

SOURCE = Path(__file__).with_name("zygote_native.c")
_FLAGS = ("-O2", "-fPIC", "-shared", "-Wall", "-Werror", "-fno-stack-protector")


class NativeBuildError(RuntimeError):
    pass


def _compiler() -> str | None:
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "python-executor"


def build(compiler: str, output: Path) -> None:
    """Compile ``SOURCE`` into ``output``; NativeBuildError with the compiler's words."""
    done = subprocess.run(
        [compiler, *_FLAGS, "-o", str(output), str(SOURCE)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    if done.returncode != 0:
        raise NativeBuildError(f"{compiler} failed: {(done.stderr or done.stdout).strip()[-2000:]}")


@functools.cache
def native_library() -> bytes | None:
    """The shared object's bytes; None when it cannot be built here (logged)."""
    compiler = _compiler()
    if compiler is None:
        log.warning("no C compiler (cc, gcc or clang): zygotes are off, bwrap starts sandboxes")
        return None
    version = subprocess.run(
        [compiler, "--version"], capture_output=True, text=True, check=False
    ).stdout
    digest = hashlib.sha256(
        SOURCE.read_bytes() + "\0".join([compiler, version, *_FLAGS]).encode()
    ).hexdigest()[:24]
    cached = _cache_dir() / f"zygote-{digest}.so"
    if _ours_alone(cached.parent) and _ours_alone(cached):
        return cached.read_bytes()
    try:
        with tempfile.TemporaryDirectory(prefix="pyexec-native-") as scratch:
            built = Path(scratch) / "zygote.so"
            build(compiler, built)
            data = built.read_bytes()
    except (NativeBuildError, OSError, subprocess.SubprocessError) as exc:
        log.warning("the zygote's native part did not build: zygotes are off", error=str(exc))
        return None
    try:
        cached.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        if not _ours_alone(cached.parent):
            raise PermissionError(f"{cached.parent} is not ours alone (owner, mode 0700)")
        with tempfile.NamedTemporaryFile(dir=cached.parent, delete=False) as out:
            out.write(data)
        os.replace(out.name, cached)
    except OSError as exc:  # (kept for this process only)
        log.info("the zygote's native part is not cached", error=str(exc))
    return data


def _ours_alone(path: Path) -> bool:
    """``path`` exists, is ours and nobody else may write it (nor, for a directory,
    put or swap a file in it): the zygote runs what it holds."""
    try:
        st = path.lstat()
    except OSError:
        return False
    return st.st_uid == os.geteuid() and not st.st_mode & 0o022
