"""`make bench`: start the real server, measure it beside baselines taken in the same run,
print a table and write it to benchmarks/results/ (JSON + Markdown). See docs/benchmarks.md.

Usage::

    .venv/bin/python benchmarks/run.py                 # the full run (a few minutes)
    .venv/bin/python benchmarks/run.py --quick         # under a minute
    .venv/bin/python benchmarks/run.py --only eval,throughput
    .venv/bin/python benchmarks/run.py --server http://127.0.0.1:8080   # a running server
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict
from datetime import datetime
from pathlib import Path

from pyexec_bench.calls import Context, JsonClient, new_client
from pyexec_bench.machine import machine_info
from pyexec_bench.output import Report, print_report, write_results
from pyexec_bench.plan import FULL, QUICK, Plan
from pyexec_bench.procmem import wait_idle
from pyexec_bench.report import Row, Target, cells, markdown_table, targets_table
from pyexec_bench.server import UPLOAD_LIMIT, Server, attached_server, managed_server
from pyexec_bench.stats import Summary, bounded, percentile, summarize
from pyexec_bench.suite import SCENARIOS, run_suite
from pyexec_bench.targets import check_targets
from rich.console import Console

__all__ = [
    "Row",
    "Summary",
    "Target",
    "bounded",
    "cells",
    "check_targets",
    "main",
    "markdown_table",
    "parse_args",
    "percentile",
    "summarize",
    "targets_table",
]

RESULTS = Path(__file__).resolve().parent / "results"
DEFAULT_IMAGE = "python-executor-sandbox:latest"


def _names(text: str) -> set[str]:
    names = {n.strip() for n in text.split(",") if n.strip()}
    unknown = names - set(SCENARIOS)
    if unknown:
        choices = ", ".join(SCENARIOS)
        raise argparse.ArgumentTypeError(f"unknown {sorted(unknown)}; choose from {choices}")
    return names


def _env_pair(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, not {text!r}")
    return key, value


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a short run (under a minute)")
    parser.add_argument(
        "--only",
        type=_names,
        action="append",
        default=[],
        metavar="NAME[,NAME]",
        help="run only these scenarios (the bare baseline and idle RSS always run): "
        + ", ".join(SCENARIOS),
    )
    parser.add_argument("--server", metavar="URL", help="measure a running server instead")
    parser.add_argument("--out", type=Path, default=RESULTS, help=f"results dir ({RESULTS})")
    parser.add_argument(
        "--server-env",
        type=_env_pair,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra environment of the server we start (e.g. PYEXEC_STORE=memory)",
    )
    parser.add_argument(
        "--docker-image",
        default=os.environ.get("PYEXEC_DEFAULT_IMAGE", DEFAULT_IMAGE),
        help="image of the Docker baseline",
    )
    return parser.parse_args(argv)


@contextlib.contextmanager
def _server(args: argparse.Namespace) -> Iterator[Server]:
    if args.server:
        with attached_server(args.server) as server:
            yield server
    else:
        with managed_server(dict(args.server_env)) as server:
            yield server


def _other_python(server: Server, default: str) -> str | None:
    others = [v for v in server.python_versions if v != default]
    preferred = [v for v in ("3.11", "3.13", "3.12") if v in others]
    return (preferred or others or [None])[0]


def _notes(machine: dict[str, object], plan: Plan, server: Server) -> list[str]:
    notes = [
        "The client runs on the same machine and cores as the server.",
        "The p99 target is checked against the bare start's p50 (the stricter reading).",
    ]
    if server.managed:
        notes.append(
            f"The server ran with PYEXEC_MAX_UPLOAD_BYTES={UPLOAD_LIMIT}: under the default "
            "1 GiB limit a 1 GiB tar's multipart body is a few hundred bytes too big (413)."
        )
    before, after = _load1(machine, "load_before"), _load1(machine, "load_after")
    cores = machine.get("cores")
    if isinstance(cores, int) and max(before, after) > cores / 2:
        notes.append(
            f"Other work shared the {cores} cores: load average {before:.1f} at the start, "
            f"{after:.1f} at the end. Compare rows within this run, not across runs."
        )
    if plan.name == "quick":
        notes.append("A --quick run: fewer samples, no 1 GiB upload.")
    return notes


def _load1(machine: dict[str, object], key: str) -> float:
    value = machine.get(key)
    return float(value[0]) if isinstance(value, list) and value else 0.0


def measure(args: argparse.Namespace, plan: Plan, console: Console) -> Report:
    started, clock = datetime.now(), time.monotonic()
    machine = machine_info() | {"load_before": [round(x, 2) for x in os.getloadavg()]}
    only = set().union(*args.only) if args.only else set()
    with _server(args) as server:
        console.print(f"server {server.url} (pid {server.pid}); waiting for it to be idle …")
        if server.pid:
            wait_idle(server.pid, plan.idle_wait_seconds)
        default = server.default_python or f"{sys.version_info[0]}.{sys.version_info[1]}"
        scratch = server.data_dir or Path(tempfile.gettempdir())
        with new_client(server.url) as client, JsonClient(server.url) as calls:
            other = _other_python(server, default)
            ctx = Context(server, plan, client, calls, default, other, scratch, args.docker_image)
            rows = run_suite(ctx, only, lambda text: console.print(f"[dim]{text}[/dim]"))
    machine["load_after"] = [round(x, 2) for x in os.getloadavg()]
    return Report(
        started=started,
        duration_s=time.monotonic() - clock,
        plan=plan.name,
        plan_settings=asdict(plan),
        machine=machine,
        server=server.as_dict(),
        rows=rows,
        targets=check_targets(rows),
        notes=_notes(machine, plan, server),
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    plan = QUICK if args.quick else FULL
    console = Console(width=None if sys.stdout.isatty() else 160)
    report = measure(args, plan, console)
    print_report(report, console)
    for path in write_results(report, args.out):
        console.print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
