"""``python-executor``: the command line.

Usage::

    python-executor run script.py -- --its-own "arguments"
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from typer.main import get_command

from ..errors import InvalidInput, PythonExecutorError
from .output import EXIT_SERVICE, EXIT_USAGE, PROG, State, error

__all__ = ["main", "split_script_args"]


def split_script_args(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """Ours before the first ``--``; the program's after it (taken verbatim)."""
    args = list(argv)
    if "--" not in args:
        return args, []
    cut = args.index("--")
    return args[:cut], args[cut + 1 :]


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point: parse, run, and turn our errors into one stderr line and an exit code."""
    from .app import app

    ours, script_args = split_script_args(sys.argv[1:] if argv is None else argv)
    try:
        get_command(app).main(args=ours, prog_name=PROG, obj=State(script_args=script_args))
    except InvalidInput as exc:
        error(exc.message)
        sys.exit(EXIT_USAGE)
    except PythonExecutorError as exc:
        error(str(exc))
        sys.exit(EXIT_SERVICE)
