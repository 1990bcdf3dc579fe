"""What each command does, given its parsed options (``app.py`` declares them)."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .._base import DEFAULT_SERVER
from .._client import PythonExecutorClient
from .._version import __version__
from ..errors import InvalidInput
from ..models import ExecutionResult, ExecutionStatus, LogEventType
from . import output
from .inputs import (
    RunFlags,
    binary_stdin,
    choose_input,
    program_stdin,
    read_text,
    resolve_env,
    run_options,
)
from .output import State
from .progress import UploadProgress

__all__ = ["EvalFlags", "evaluate", "execute", "follow", "kill", "listing", "logs", "version"]


def _client(state: State) -> PythonExecutorClient:
    return PythonExecutorClient(state.server or DEFAULT_SERVER)


def execute(state: State, flags: RunFlags, wait: bool) -> int:
    """``run`` (``wait``) and ``submit``."""
    stdin = binary_stdin()
    source = choose_input(flags, stdin)
    if source.ignored:
        output.note(state, f"ignoring {source.ignored}: --file takes precedence")
    options = run_options(flags, stdin)
    with _client(state) as client, UploadProgress.for_stderr(state.quiet) as progress:
        if not wait:
            execution_id = client.execute_async(
                source.files, source.tar_data, upload_progress=progress, **options
            )
            print(execution_id, flush=True)
            return 0
        result = client.execute_sync(
            source.files, source.tar_data, upload_progress=progress, **options
        )
    return output.print_result(result, state)


def follow(state: State, execution_id: str) -> int:
    with _client(state) as client:
        for event in client.follow(execution_id):
            if event.type is LogEventType.STDOUT:
                output.write(sys.stdout, event.text)
            elif event.type is LogEventType.STDERR and not state.quiet:
                output.write(sys.stderr, event.text)
            elif event.result is not None:
                return output.finish(event.result, state)
    raise AssertionError("follow() ends with an exit event")


def logs(state: State, execution_id: str) -> int:
    with _client(state) as client:
        result = client.get_execution(execution_id)
    output.print_result(result, state)
    return 0


def kill(state: State, execution_id: str) -> int:
    with _client(state) as client:
        status = client.kill(execution_id)
    if not state.quiet:
        already = "" if status == ExecutionStatus.KILLED.value else "already "
        print(f"{execution_id} {already}{status}")
    return 0


def listing(state: State, status: ExecutionStatus | None, limit: int, cursor: str | None) -> int:
    with _client(state) as client:
        output.print_listing(client.list_executions(status, limit, cursor), state)
    return 0


@dataclass(frozen=True)
class EvalFlags:
    python: str | None = None
    timeout: int | None = None
    memory: int | None = None
    network: bool = False
    image: str | None = None
    requirements: Path | None = None
    stdin_file: str | None = None
    env: tuple[str, ...] = ()
    no_result: bool = False


def evaluate(state: State, code: str | None, flags: EvalFlags) -> int:
    stdin = binary_stdin()
    if code is None:
        code = _code_from_stdin(flags)
    with _client(state) as client:
        result = client.eval(
            code,
            eval_last_expr=not flags.no_result,
            python_version=flags.python,
            timeout_seconds=flags.timeout,
            stdin=program_stdin(flags.stdin_file, stdin),
            **_eval_options(flags, state),
        )
    _print_eval(result, state)
    return output.finish(result, state)


def _code_from_stdin(flags: EvalFlags) -> str:
    if flags.stdin_file == "-":
        raise InvalidInput("--stdin-file - needs the code as an argument")
    stdin = binary_stdin()
    if stdin.isatty():
        raise InvalidInput("no code: give it as an argument or pipe it in")
    code = stdin.read().decode("utf-8", "replace")
    if not code.strip():
        raise InvalidInput("no code: standard input is empty")
    return code


def _eval_options(flags: EvalFlags, state: State) -> dict[str, Any]:
    return {
        "memory_mb": flags.memory,
        "network_disabled": False if flags.network else None,
        "docker_image": flags.image,
        "requirements_txt": read_text(flags.requirements, "--requirements"),
        "env_vars": resolve_env(flags.env) or None,
        "script_args": state.script_args or None,
    }


def _print_eval(result: ExecutionResult, state: State) -> None:
    value = f"{result.result}\n" if result.result is not None else ""
    if state.quiet:
        output.write(sys.stdout, value or result.stdout)
        return
    output.write(sys.stdout, result.stdout)
    output.write(sys.stdout, value)
    output.write(sys.stderr, result.stderr)


def version(state: State) -> int:
    print(f"python-executor-client {__version__}")
    if state.verbose:
        with _client(state) as client:
            health = client.health()
        print(f"server {client.base_url}: {_health_line(health)}")
    return 0


def _health_line(health: dict[str, Any]) -> str:
    """Top-level scalars and lists of ``/health``; nested details are left to ``curl``."""
    parts = []
    for key, value in health.items():
        if isinstance(value, list):
            value = ",".join(str(item) for item in value)
        if not isinstance(value, dict):
            parts.append(f"{key}={value}")
    return " ".join(parts)
