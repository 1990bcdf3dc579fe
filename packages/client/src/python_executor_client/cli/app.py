"""The ``python-executor`` commands and their options; the work is in ``commands.py``.

``--server``, ``-q`` and ``-v`` are declared on the root and on every command, so
they work before and after the command name (the command's own value wins).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from .._base import DEFAULT_SERVER
from ..models import ExecutionStatus
from . import commands, examples
from .inputs import RunFlags
from .output import State

__all__ = ["app"]

app = typer.Typer(
    name="python-executor",
    help="Run Python on a python-executor server: a file, a directory, a tar or piped code.",
    epilog=examples.MAIN,
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

Server = Annotated[
    str | None,
    typer.Option(
        "--server",
        metavar="URL",
        show_default=False,
        help="Server URL \\[default: $PYEXEC_SERVER or http://localhost:8080].",
    ),
]
Quiet = Annotated[
    bool,
    typer.Option("--quiet", "-q", metavar="", help="Only the program's stdout (and error lines)."),
]
Verbose = Annotated[
    bool,
    typer.Option("--verbose", "-v", metavar="", help="Also print execution details on stderr."),
]
ExecutionId = Annotated[str, typer.Argument(metavar="ID", help="An execution id (exe_…).")]
PathArg = Annotated[
    Path | None,
    typer.Argument(
        metavar="PATH",
        show_default=False,
        help="A .py file, a directory or an uncompressed .tar; standard input when omitted.",
    ),
]
Files = Annotated[
    list[Path] | None,
    typer.Option(
        "--file", metavar="PATH", help="Add a file or directory, kept at its relative path."
    ),
]
Entrypoint = Annotated[
    str | None, typer.Option(metavar="FILE", help="File to run \\[default: auto-detect].")
]
Timeout = Annotated[int | None, typer.Option(metavar="SECONDS", help="Wall-clock limit.")]
Memory = Annotated[int | None, typer.Option(metavar="MB", help="Memory limit.")]
Disk = Annotated[int | None, typer.Option(metavar="MB", help="How much the run may write.")]
Cpu = Annotated[int | None, typer.Option(metavar="SHARES", help="Relative CPU weight.")]
Network = Annotated[
    bool, typer.Option("--network", metavar="", help="Let the program use the network.")
]
Image = Annotated[str | None, typer.Option(metavar="IMAGE", help="Docker image (docker backend).")]
Python = Annotated[str | None, typer.Option(metavar="X.Y", help="Python version, e.g. 3.12.")]
Requirements = Annotated[
    Path | None, typer.Option(metavar="FILE", help="A requirements.txt to install first.")
]
Pre = Annotated[
    list[str] | None,
    typer.Option(metavar="CMD", help="Shell command run before the program (repeatable)."),
]
StdinFile = Annotated[
    str | None,
    typer.Option(metavar="FILE", help="Feed FILE to the program's stdin ('-': our stdin)."),
]
Env = Annotated[
    list[str] | None,
    typer.Option(
        "--env", "-e", metavar="KEY[=VALUE]", help="Set a variable; KEY alone copies ours."
    ),
]


def _state(ctx: typer.Context, server: str | None, quiet: bool, verbose: bool) -> State:
    root = ctx.find_object(State) or State()
    return State(
        server or root.server, quiet or root.quiet, verbose or root.verbose, root.script_args
    )


def _no_script_args(state: State, command: str) -> None:
    if state.script_args:
        raise typer.BadParameter(f"{command} takes no arguments after --")


@app.callback()
def root(
    ctx: typer.Context,
    server: Annotated[
        str, typer.Option("--server", envvar="PYEXEC_SERVER", metavar="URL", help="Server URL.")
    ] = DEFAULT_SERVER,
    quiet: Quiet = False,
    verbose: Verbose = False,
) -> None:
    """Run Python on a python-executor server."""
    state = ctx.ensure_object(State)
    state.server, state.quiet, state.verbose = server, quiet, verbose


@app.command(epilog=examples.RUN)
def run(
    ctx: typer.Context,
    path: PathArg = None,
    file: Files = None,
    entrypoint: Entrypoint = None,
    timeout: Timeout = None,
    memory: Memory = None,
    disk: Disk = None,
    cpu: Cpu = None,
    network: Network = False,
    image: Image = None,
    python: Python = None,
    requirements: Requirements = None,
    pre: Pre = None,
    stdin_file: StdinFile = None,
    env: Env = None,
    submit_only: Annotated[
        bool, typer.Option("--async", metavar="", help="Submit and print the id (like submit).")
    ] = False,
    server: Server = None,
    quiet: Quiet = False,
    verbose: Verbose = False,
) -> None:
    """Run code and wait: its stdout, stderr and exit code become ours. Args after -- go to it."""
    state = _state(ctx, server, quiet, verbose)
    flags = RunFlags(
        path, tuple(file or ()), entrypoint, timeout, memory, disk, cpu, network, image,
        python, requirements, tuple(pre or ()), stdin_file, tuple(env or ()), state.script_args,
    )  # fmt: skip
    raise typer.Exit(commands.execute(state, flags, wait=not submit_only))


@app.command(epilog=examples.SUBMIT)
def submit(
    ctx: typer.Context,
    path: PathArg = None,
    file: Files = None,
    entrypoint: Entrypoint = None,
    timeout: Timeout = None,
    memory: Memory = None,
    disk: Disk = None,
    cpu: Cpu = None,
    network: Network = False,
    image: Image = None,
    python: Python = None,
    requirements: Requirements = None,
    pre: Pre = None,
    stdin_file: StdinFile = None,
    env: Env = None,
    server: Server = None,
    quiet: Quiet = False,
    verbose: Verbose = False,
) -> None:
    """Start code without waiting; print only its execution id. Same input and options as run."""
    state = _state(ctx, server, quiet, verbose)
    flags = RunFlags(
        path, tuple(file or ()), entrypoint, timeout, memory, disk, cpu, network, image,
        python, requirements, tuple(pre or ()), stdin_file, tuple(env or ()), state.script_args,
    )  # fmt: skip
    raise typer.Exit(commands.execute(state, flags, wait=False))


@app.command(epilog=examples.FOLLOW)
def follow(
    ctx: typer.Context,
    execution_id: ExecutionId,
    server: Server = None,
    quiet: Quiet = False,
    verbose: Verbose = False,
) -> None:
    """Print an execution's output as it is produced, until it ends."""
    state = _state(ctx, server, quiet, verbose)
    _no_script_args(state, "follow")
    raise typer.Exit(commands.follow(state, execution_id))


@app.command(epilog=examples.LOGS)
def logs(
    ctx: typer.Context,
    execution_id: ExecutionId,
    server: Server = None,
    quiet: Quiet = False,
    verbose: Verbose = False,
) -> None:
    """Print the output an execution has produced (stdout to stdout, stderr to stderr)."""
    state = _state(ctx, server, quiet, verbose)
    _no_script_args(state, "logs")
    raise typer.Exit(commands.logs(state, execution_id))


@app.command(epilog=examples.KILL)
def kill(
    ctx: typer.Context,
    execution_id: ExecutionId,
    server: Server = None,
    quiet: Quiet = False,
    verbose: Verbose = False,
) -> None:
    """Stop a pending or running execution."""
    state = _state(ctx, server, quiet, verbose)
    _no_script_args(state, "kill")
    raise typer.Exit(commands.kill(state, execution_id))


@app.command("eval", epilog=examples.EVAL)
def eval_(
    ctx: typer.Context,
    code: Annotated[
        str | None, typer.Argument(metavar="CODE", show_default=False, help="Python code.")
    ] = None,
    python: Python = None,
    timeout: Timeout = None,
    memory: Memory = None,
    network: Network = False,
    image: Image = None,
    requirements: Requirements = None,
    stdin_file: StdinFile = None,
    env: Env = None,
    no_result: Annotated[
        bool, typer.Option("--no-result", metavar="", help="Just run it; no last-expression value.")
    ] = False,
    server: Server = None,
    quiet: Quiet = False,
    verbose: Verbose = False,
) -> None:
    """Run code and print the value of its last expression, like the REPL."""
    state = _state(ctx, server, quiet, verbose)
    flags = commands.EvalFlags(
        python, timeout, memory, network, image, requirements, stdin_file, tuple(env or ()),
        no_result,
    )  # fmt: skip
    raise typer.Exit(commands.evaluate(state, code, flags))


@app.command("list", epilog=examples.LIST)
def list_(
    ctx: typer.Context,
    status: Annotated[
        ExecutionStatus | None, typer.Option(help="Only executions in this state.")
    ] = None,
    limit: Annotated[int, typer.Option(min=1, help="How many to show.")] = 20,
    cursor: Annotated[
        str | None, typer.Option(help="Continue after a previous page (printed with it).")
    ] = None,
    server: Server = None,
    quiet: Quiet = False,
    verbose: Verbose = False,
) -> None:
    """List executions, newest first (-q: ids only)."""
    state = _state(ctx, server, quiet, verbose)
    _no_script_args(state, "list")
    raise typer.Exit(commands.listing(state, status, limit, cursor))


@app.command(epilog=examples.VERSION)
def version(
    ctx: typer.Context,
    server: Server = None,
    quiet: Quiet = False,
    verbose: Verbose = False,
) -> None:
    """Print the client's version (-v: also ask the server's /health)."""
    state = _state(ctx, server, quiet, verbose)
    raise typer.Exit(commands.version(state))
