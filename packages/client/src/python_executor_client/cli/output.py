"""What the CLI prints and which exit code it ends with.

Exit codes: the program's own when it ran to its end; 124 when the server timed it
out; 137 when it was killed; 1 for another failed run; 2 for a usage or local
input error; 125 when the server could not be reached or refused the request.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TextIO

from ..models import ExecutionList, ExecutionResult, ExecutionStatus

__all__ = [
    "EXIT_FAILED",
    "EXIT_KILLED",
    "EXIT_SERVICE",
    "EXIT_TIMEOUT",
    "EXIT_USAGE",
    "State",
    "error",
    "exit_code",
    "finish",
    "note",
    "print_listing",
    "write",
]

EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_TIMEOUT = 124
EXIT_SERVICE = 125
EXIT_KILLED = 137
PROG = "python-executor"


@dataclass
class State:
    """Options that may come before or after the command name."""

    server: str | None = None
    quiet: bool = False
    verbose: bool = False
    script_args: list[str] = field(default_factory=list)


def write(stream: TextIO, text: str) -> None:
    """Program output, written as UTF-8 whatever the locale, and flushed at once."""
    if not text:
        return
    buffer = getattr(stream, "buffer", None)
    if buffer is None:
        stream.write(text)
    else:
        stream.flush()
        buffer.write(text.encode("utf-8", "replace"))
    stream.flush()


def error(message: str) -> None:
    """One line on stderr: ``python-executor: <message>``."""
    text = " ".join(message.split())
    sys.stderr.write(f"{PROG}: {text}\n")
    sys.stderr.flush()


def note(state: State, message: str) -> None:
    if not state.quiet:
        error(message)


def exit_code(result: ExecutionResult) -> int:
    if result.status is ExecutionStatus.KILLED:
        return EXIT_KILLED
    if result.status is ExecutionStatus.FAILED:
        if result.error and "timed out" in result.error:
            return EXIT_TIMEOUT
        return _shell_code(result.exit_code) or EXIT_FAILED
    return _shell_code(result.exit_code)


def _shell_code(code: int | None) -> int:
    if code is None:
        return 0
    return 128 - code if code < 0 else code % 256  # -9 (a signal) → 137, like a shell


def finish(result: ExecutionResult, state: State) -> int:
    """After the output: notes, details with ``-v``, the reason of a failed run; the exit code."""
    for name, truncated in (
        ("stdout", result.stdout_truncated),
        ("stderr", result.stderr_truncated),
    ):
        if truncated:
            note(state, f"note: the server truncated the program's {name}")
    if state.verbose and not state.quiet:
        for line in _details(result):
            sys.stderr.write(f"{line}\n")
    if result.status is ExecutionStatus.KILLED:
        error(f"execution {result.execution_id} was killed")
    elif result.status is ExecutionStatus.FAILED:
        error(f"execution failed: {result.error or 'no reason given'}")
    elif not result.status.finished:
        note(state, f"execution {result.execution_id} is still {result.status.value}")
    return exit_code(result)


def print_result(result: ExecutionResult, state: State) -> int:
    write(sys.stdout, result.stdout)
    if not state.quiet:
        write(sys.stderr, result.stderr)
    return finish(result, state)


def _details(result: ExecutionResult) -> Iterator[str]:
    yield f"execution   {result.execution_id}"
    yield f"status      {result.status.value}"
    if result.exit_code is not None:
        yield f"exit code   {result.exit_code}"
    if result.duration_ms is not None:
        yield f"duration    {result.duration_ms} ms"
    if result.error_type:
        where = f" at line {result.error_line}" if result.error_line else ""
        yield f"exception   {result.error_type}{where}"
    usage = result.usage
    if usage is not None and usage.cpu_ms is not None:
        yield f"cpu time    {usage.cpu_ms} ms"
    if usage is not None and usage.peak_memory_mb is not None:
        yield f"peak memory {usage.peak_memory_mb:g} MB"


def print_listing(listing: ExecutionList, state: State) -> None:
    if state.quiet:
        for item in listing.executions:
            print(item.execution_id)
        return
    rows = [("EXECUTION ID", "STATUS", "EXIT", "STARTED", "DURATION")]
    rows += [_row(item) for item in listing.executions]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print(
            "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        )
    if listing.next_cursor:
        note(state, f"more: --cursor {listing.next_cursor}")


def _row(item: ExecutionResult) -> tuple[str, str, str, str, str]:
    started = item.started_at.strftime("%Y-%m-%d %H:%M:%S") if item.started_at else "-"
    duration = f"{item.duration_ms} ms" if item.duration_ms is not None else "-"
    code = str(item.exit_code) if item.exit_code is not None else "-"
    return item.execution_id, item.status.value, code, started, duration
