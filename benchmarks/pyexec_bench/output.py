"""A finished run as a dict, a rich console table, and files in the results directory
(``bench-<date>-<time>[-quick].json`` / ``.md`` plus ``latest.json`` / ``latest.md``).

Usage::

    report = build_report(rows, machine=..., server=..., plan_name="full", ...)
    print_report(report, rows)
    paths = write_results(report, rows, Path("benchmarks/results"))
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from .machine import summary_line
from .report import HEADERS, Row, Target, cells, markdown_table, targets_table

SCHEMA = 1


@dataclass
class Report:
    started: datetime
    duration_s: float
    plan: str
    plan_settings: dict[str, Any]
    machine: dict[str, Any]
    server: dict[str, Any]
    rows: Sequence[Row]
    targets: Sequence[Target]
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {
            "schema": SCHEMA,
            "started_at": self.started.isoformat(timespec="seconds"),
            "duration_s": round(self.duration_s, 1),
            "plan": self.plan,
            "plan_settings": self.plan_settings,
            "machine": self.machine,
            "server": self.server,
            "rows": [row.as_dict(self.rows) for row in self.rows],
            "targets": [t.__dict__ | {"verdict": t.verdict} for t in self.targets],
            "notes": self.notes,
        }


def markdown(report: Report) -> str:
    when = report.started.strftime("%Y-%m-%d %H:%M")
    lines = [
        f"# python-executor benchmark, {when} ({report.plan} run, {report.duration_s:.0f} s)",
        "",
        f"Machine: {summary_line(report.machine)}. Server: {_server_line(report.server)}.",
        f"Code: {_code_line(report.machine)}. Load average before/after: "
        f"{report.machine.get('load_before')} / {report.machine.get('load_after')}.",
        "Ratios are row ÷ baseline, both measured in this run (p50 ÷ p50 / p99 ÷ p99, "
        "or rate ÷ rate).",
        "",
        markdown_table(report.rows),
        "",
        "## Targets (issue 4)",
        "",
        targets_table(report.targets),
    ]
    if report.notes:
        lines += ["", "## Notes", "", *(f"- {n}" for n in report.notes)]
    return "\n".join(lines) + "\n"


def _code_line(machine: dict[str, Any]) -> str:
    dirty = " with uncommitted changes" if machine.get("git_dirty") else ""
    return (
        f"commit {machine.get('git_commit')}{dirty}, "
        f"server sources {machine.get('server_source_sha256')}"
    )


def _server_line(server: dict[str, Any]) -> str:
    health = server.get("health", {})
    sandbox = health.get("sandbox", {})
    parts = [
        f"{health.get('backend', '?')} backend",
        f"default python {health.get('default_python', '?')}",
        f"store {health.get('store', '?')}",
        f"cgroup {sandbox.get('cgroup', '?')}",
        f"seccomp {sandbox.get('seccomp', '?')}",
        "started by the benchmark" if server.get("managed") else f"attached at {server.get('url')}",
    ]
    return ", ".join(str(p) for p in parts)


def print_report(report: Report, console: Console | None = None) -> None:
    console = console or Console()
    table = Table(title=f"python-executor benchmark ({report.plan})")
    for header in HEADERS[:-1]:  # the notes go below the table
        table.add_column(header, overflow="fold")
    for row in report.rows:
        table.add_row(*cells(row, report.rows)[:-1])
    console.print(table)
    for row in report.rows:
        note = cells(row, report.rows)[-1]
        if note:
            console.print(f"[dim]{row.label}:[/dim] {note}", highlight=False)
    targets = Table(title="Targets (issue 4)")
    for header in ("Target", "measured", "limit", "verdict"):
        targets.add_column(header, overflow="fold")
    for t in report.targets:
        style = {True: "green", False: "red", None: "yellow"}[t.ok]
        targets.add_row(t.name, t.measured, t.limit, f"[{style}]{t.verdict}[/{style}]")
    console.print(targets)
    console.print(f"Machine: {summary_line(report.machine)}")
    for note in report.notes:
        console.print(f"note: {note}")


def write_results(report: Report, out_dir: Path) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = report.started.strftime("%Y%m%d-%H%M%S")
    stem = f"bench-{stamp}" + ("" if report.plan == "full" else f"-{report.plan}")
    text_json = json.dumps(report.as_dict(), indent=2) + "\n"
    text_md = markdown(report)
    written = []
    for name, text in ((f"{stem}.json", text_json), (f"{stem}.md", text_md),
                       ("latest.json", text_json), ("latest.md", text_md)):  # fmt: skip
        path = out_dir / name
        path.write_text(text)
        written.append(path)
    return written
