"""Host side of the eval driver: the command that runs a user program, and what it reports.

Every run is one command::

    <python> -I -c <source of _sandbox_main.py> [--result-fd N] [--eval] [--pre CMD]...
        [--path DIR]... -- /work/main.py ARG...

The driver travels as ``-c`` source, so no backend has to mount it. Its first
``PRESTART`` arguments (``<python> -I -c <source>``) do not depend on the run: a
backend may start them ahead of the request and send the rest, with the environment,
as the job (``RunSpec.prestart``; ``_sandbox_main.py`` reads it from ``--job-fd``). It runs the
pre-commands and then the entrypoint as ``__main__``, and at exit writes one JSON line
(``result``, ``error_type``, ``error_line``, ``pre_command_failed``) to ``result_fd``, a
pipe the backend passes in — never to stdout, so nothing the program prints can forge it.

The backend should keep the *last* ``REPORT_MAX_BYTES`` of that pipe: the program can
write to it too, and the driver's line is the last JSON one (an ``exit N`` line may
follow it: ``sandbox.base.end_code``). When there is no report (the
process was killed or called ``os._exit``), ``parse_traceback`` recovers the error from
stderr.

Usage::

    argv = driver_argv(python, entrypoint="/work/main.py", args=[], eval_last_expr=True,
                       pre_commands=[], result_fd=RESULT_FD)
    report = parse_report(outcome.side_channel)
"""

from __future__ import annotations

import functools
import json
import os
import posixpath
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

RESULT_FD = 3  # the report pipe's fd number inside the sandbox
PRESTART = 4  # <python> -I -c <source>: the part of driver_argv the same for every run
REPORT_MAX_BYTES = 16 * 1024 * 1024  # > any report line: results are cut at 1 Mi characters


@dataclass(frozen=True)
class DriverReport:
    """What the driver reported; all None when it reported nothing."""

    result: str | None = None  # repr() of the trailing expression (eval_last_expr)
    error_type: str | None = None  # "NameError", "json.decoder.JSONDecodeError", "MyError"
    error_line: int | None = None  # line in the entrypoint
    pre_command_failed: int | None = None  # index of the pre-command that ended the run


@functools.cache
def sandbox_main_source() -> str:
    return Path(__file__).with_name("_sandbox_main.py").read_text(encoding="utf-8")


def driver_argv(
    python: str | os.PathLike[str],
    *,
    entrypoint: str,
    args: Sequence[str],
    eval_last_expr: bool,
    pre_commands: Sequence[str],
    result_fd: int | None,
    extra_paths: Sequence[str] = (),
) -> tuple[str, ...]:
    """The command line of one run; ``entrypoint`` is its absolute path inside the sandbox,
    ``extra_paths`` the requirement environments (they go before site-packages)."""
    if not posixpath.isabs(entrypoint):
        raise ValueError(f"entrypoint must be an absolute path, got {entrypoint!r}")
    argv = [os.fspath(python), "-I", "-c", sandbox_main_source()]
    if result_fd is not None:
        argv += ["--result-fd", str(result_fd)]
    if eval_last_expr:
        argv.append("--eval")
    for command in pre_commands:
        argv += ["--pre", command]
    for path in extra_paths:
        argv += ["--path", path]
    return (*argv, "--", entrypoint, *args)


def parse_report(side_channel: bytes) -> DriverReport:
    """The last valid report line; an empty report when there is none."""
    for line in reversed(side_channel.split(b"\n")):
        report = _report_from(line)
        if report is not None:
            return report
    return DriverReport()


def _report_from(line: bytes) -> DriverReport | None:
    try:
        data = json.loads(line)
    except ValueError:
        return None
    if not isinstance(data, dict):
        return None
    result, error_type = data.get("result"), data.get("error_type")
    error_line, failed = data.get("error_line"), data.get("pre_command_failed")
    if not all(isinstance(v, str | None) for v in (result, error_type)):
        return None
    if not all(v is None or type(v) is int for v in (error_line, failed)):  # not bool
        return None
    return DriverReport(result, error_type, error_line, failed)


_HEADERS = (
    "Traceback (most recent call last):",
    "  + Exception Group Traceback (most recent call last):",
)
_FRAME = re.compile(r'  File "(?P<file>.*)", line (?P<line>\d+)')
_EXCEPTION = re.compile(r"(?P<type>[A-Za-z_][\w.<>]*)(?::|$)")


def parse_traceback(stderr: str, entrypoint: str) -> tuple[str | None, int | None]:
    """``(error_type, error_line)`` of the last traceback in ``stderr``, as the driver reports
    them: the exception's name as printed, and the innermost ``File`` line in ``entrypoint``
    (for a SyntaxError there, its own line). ``(None, None)`` when there is none."""
    found: tuple[str | None, int | None] = (None, None)
    in_block, line = False, None
    for raw in stderr.splitlines():
        text = raw[4:] if raw.startswith("  | ") else raw  # an exception group's own lines
        frame = _FRAME.match(text)
        if text in _HEADERS:
            in_block, line = True, None
        elif frame:
            if not in_block:  # a SyntaxError in the entrypoint has no header
                in_block, line = True, None
            if frame["file"] == entrypoint:
                line = int(frame["line"])
        elif in_block and text[:1] not in ("", " "):
            exception = _EXCEPTION.match(text)
            if exception:
                found = (exception["type"].removeprefix("__main__."), line)  # 3.10 prints it
            in_block = False
    return found
