"""Command-line flags → the client's ``files`` / ``tar_data`` and keyword options.

Input precedence: ``--file`` (repeatable), an explicit ``.tar``, a directory, a
single file, standard input (becomes ``main.py``).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from .._packing import FilesInput, TarInput
from ..errors import InvalidInput

__all__ = [
    "Input",
    "RunFlags",
    "binary_stdin",
    "choose_input",
    "program_stdin",
    "read_text",
    "resolve_env",
    "run_options",
]

STDIN_NAME = "main.py"
_COMPRESSED = (".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz", ".tar.zst", ".zip")


@dataclass(frozen=True)
class RunFlags:
    """What ``run`` and ``submit`` were given, before any file is read."""

    path: Path | None = None
    files: Sequence[Path] = ()
    entrypoint: str | None = None
    timeout: int | None = None
    memory: int | None = None
    disk: int | None = None
    cpu: int | None = None
    network: bool = False
    image: str | None = None
    python: str | None = None
    requirements: Path | None = None
    pre: Sequence[str] = ()
    stdin_file: str | None = None
    env: Sequence[str] = ()
    script_args: Sequence[str] = field(default_factory=tuple)


@dataclass(frozen=True)
class Input:
    files: FilesInput | None = None
    tar_data: TarInput | None = None
    ignored: str | None = None  # a path argument that --file took precedence over


def choose_input(flags: RunFlags, stdin: BinaryIO) -> Input:
    if flags.files:
        ignored = str(flags.path) if flags.path is not None else None
        return Input(files=list(flags.files), ignored=ignored)
    if flags.path is not None:
        if flags.path.name.lower().endswith(_COMPRESSED):
            raise InvalidInput(f"{flags.path}: only an uncompressed .tar is accepted")
        if flags.path.suffix.lower() == ".tar" and flags.path.is_file():
            return Input(tar_data=flags.path)
        if not flags.path.exists():
            raise InvalidInput(f"no such file or directory: {flags.path}")
        return Input(files=flags.path)
    if flags.stdin_file == "-":
        raise InvalidInput("--stdin-file - needs the code in a file: standard input is the program")
    return Input(files={STDIN_NAME: _read_code(stdin)})


def _read_code(stdin: BinaryIO) -> bytes:
    if stdin.isatty():
        raise InvalidInput("no input: give a .py file, a directory or a .tar, or pipe code in")
    code = stdin.read()
    if not code.strip():
        raise InvalidInput("no input: standard input is empty")
    return code


def resolve_env(entries: Sequence[str], environ: Mapping[str, str] | None = None) -> list[str]:
    """``KEY=VALUE`` as given; a bare ``KEY`` takes its value from our environment."""
    environ = os.environ if environ is None else environ
    resolved = []
    for entry in entries:
        key, has_value, _ = entry.partition("=")
        if not key:
            raise InvalidInput(f"invalid --env {entry!r}: expected KEY or KEY=VALUE")
        if not has_value:
            if key not in environ:
                raise InvalidInput(f"--env {key}: no such variable in the environment")
            entry = f"{key}={environ[key]}"
        resolved.append(entry)
    return resolved


def run_options(flags: RunFlags, stdin: BinaryIO) -> dict[str, Any]:
    """The keyword options of ``execute_*`` (``None`` leaves the server's default)."""
    return {
        "entrypoint": flags.entrypoint,
        "timeout_seconds": flags.timeout,
        "memory_mb": flags.memory,
        "disk_mb": flags.disk,
        "cpu_shares": flags.cpu,
        "network_disabled": False if flags.network else None,
        "docker_image": flags.image,
        "python_version": flags.python,
        "requirements_txt": read_text(flags.requirements, "--requirements"),
        "pre_commands": list(flags.pre) or None,
        "stdin": program_stdin(flags.stdin_file, stdin),
        "env_vars": resolve_env(flags.env) or None,
        "script_args": list(flags.script_args) or None,
    }


def program_stdin(stdin_file: str | None, stdin: BinaryIO) -> str | None:
    """``--stdin-file PATH``, or ``-`` for our own standard input."""
    if stdin_file is None:
        return None
    if stdin_file == "-":
        return stdin.read().decode("utf-8", "replace")
    return read_text(Path(stdin_file), "--stdin-file")


def read_text(path: Path | None, flag: str) -> str | None:
    if path is None:
        return None
    try:
        return path.read_bytes().decode("utf-8", "replace")
    except OSError as exc:
        raise InvalidInput(f"{flag} {path}: {exc.strerror or exc}") from None


def binary_stdin() -> BinaryIO:
    return sys.stdin.buffer
