"""Discovery of the Python interpreters user code can run with.

Usage::

    pythons = discover_interpreters(settings)   # {"3.12": Interpreter(...), ...}
"""

from __future__ import annotations

import glob
import json
import subprocess
from collections.abc import Mapping
from pathlib import Path

from ..sandbox.base import Interpreter
from ..settings import Settings

_PROBE = (
    "import sys,json;"
    "print(json.dumps([f'{sys.version_info[0]}.{sys.version_info[1]}',sys.base_prefix]))"
)


def _candidates(settings: Settings) -> list[str]:
    found = list(settings.python_interpreters)
    found += sorted(glob.glob(str(Path.home() / ".pyenv/versions/3.*/bin/python3.*[0-9]")))
    found += sorted(glob.glob("/usr/local/bin/python3.*[0-9]"))
    found += sorted(glob.glob("/usr/bin/python3.*[0-9]"))
    found += sorted(glob.glob(str(Path.home() / ".local/share/uv/python/*/bin/python3.*[0-9]")))
    return found


def probe(executable: str) -> Interpreter | None:
    try:
        out = subprocess.run(
            [executable, "-I", "-S", "-c", _PROBE], capture_output=True, timeout=10, check=True
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    version, prefix = json.loads(out)
    return Interpreter(version=version, executable=Path(executable).resolve(), prefix=Path(prefix))


def discover_interpreters(settings: Settings) -> dict[str, Interpreter]:
    """First interpreter found wins for each X.Y; only 3.10 and newer are offered."""
    found: dict[str, Interpreter] = {}
    for exe in _candidates(settings):
        interp = probe(exe)
        if interp is None or interp.version in found:
            continue
        if tuple(int(x) for x in interp.version.split(".")) >= (3, 10):
            found[interp.version] = interp
    return dict(sorted(found.items(), key=lambda kv: tuple(int(x) for x in kv[0].split("."))))


def default_version(settings: Settings, available: Mapping[str, Interpreter]) -> str:
    if settings.default_python:
        return settings.default_python
    for preferred in ("3.12", "3.11"):
        if preferred in available:
            return preferred
    if not available:
        raise RuntimeError("no Python 3.10+ interpreter found; set PYEXEC_PYTHON_INTERPRETERS")
    return list(available)[-1]
