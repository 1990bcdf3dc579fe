"""`python-executor-server`: serve the HTTP API (default) or run a queue worker.

Every option is also a PYEXEC_* environment variable; see `--help` and the README.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import typer

from .settings import Settings

if TYPE_CHECKING:
    from .queue.base import QueueUnavailable

app = typer.Typer(
    add_completion=False,
    help="python-executor server. Configuration comes from PYEXEC_* environment variables.",
)


@app.callback(invoke_without_command=True)
def _default(ctx: typer.Context) -> None:
    if ctx.invoked_subcommand is None:
        serve()


@app.command()
def serve(
    host: str | None = typer.Option(None, help="Bind address (PYEXEC_HOST, default 127.0.0.1)."),
    port: int | None = typer.Option(None, help="Port (PYEXEC_PORT, default 8080)."),
) -> None:
    """Serve the HTTP API with the configured sandbox, store and queue.

    Example: PYEXEC_PORT=9000 python-executor-server serve
    """
    import uvicorn

    from .api.http_protocol import HttpProtocol
    from .app import create_app
    from .logs import configure_logging

    overrides = {k: v for k, v in {"host": host, "port": port}.items() if v is not None}
    settings = Settings(**overrides)  # type: ignore[arg-type]
    _check(settings, worker=False)
    configure_logging(settings.log_level, settings.log_json)
    uvicorn.run(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        # httptools (pinned): parsing in C costs a third less CPU than h11; big bodies are
        # read 1 MiB at a time (api/http_protocol.py)
        http=HttpProtocol,
        log_level=settings.log_level,
        access_log=settings.log_level == "debug",
        timeout_graceful_shutdown=10,
    )


@app.command()
def worker() -> None:
    """Run executions from the shared Redis queue; no HTTP. Stops on SIGTERM / SIGINT.

    Needs PYEXEC_QUEUE=redis, PYEXEC_STORE=redis and PYEXEC_REDIS_URL; start as many as you
    like, on as many machines (each with PYEXEC_MAX_CONCURRENT consumers).

    Example: PYEXEC_QUEUE=redis PYEXEC_STORE=redis PYEXEC_REDIS_URL=redis://10.0.0.5:6379/0 \
    python-executor-server worker
    """
    import asyncio

    from .logs import configure_logging
    from .worker import run_worker

    settings = Settings(run_workers=True)
    _check(settings, worker=True)
    configure_logging(settings.log_level, settings.log_json)
    try:
        asyncio.run(run_worker(settings))
    except _queue_unavailable() as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None


def _check(settings: Settings, *, worker: bool) -> None:
    """Refuse a combination of settings that cannot work, in one clear line (exit status 2)."""
    from .queue import check_topology

    try:
        check_topology(settings, worker=worker)
    except _queue_unavailable() as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None


def _queue_unavailable() -> type[QueueUnavailable]:
    from .queue.base import QueueUnavailable

    return QueueUnavailable


def main() -> None:
    app()
