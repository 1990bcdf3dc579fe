"""`python-executor-server`: serve the HTTP API (default) or run a queue worker.

Every option is also a PYEXEC_* environment variable; see `--help` and the README.
"""

from __future__ import annotations

import typer

from .settings import Settings

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

    from .app import create_app
    from .logs import configure_logging

    overrides = {k: v for k, v in {"host": host, "port": port}.items() if v is not None}
    settings = Settings(**overrides)  # type: ignore[arg-type]
    configure_logging(settings.log_level, settings.log_json)
    uvicorn.run(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        access_log=settings.log_level == "debug",
        timeout_graceful_shutdown=10,
    )


def main() -> None:
    app()
