"""Which scenarios a run has, in which order, each guarded so one failure costs one row.

Usage::

    rows = run_suite(ctx, only={"eval", "throughput"}, progress=print)
"""

from __future__ import annotations

import time
import traceback
from collections.abc import Callable

from .calls import Context
from .procmem import wait_idle
from .report import Row
from .suite_baselines import bare_end_rows, bare_rows, bwrap_rows, docker_rows
from .suite_latency import async_rows, cold_rows, eval_rows, exec_sync_rows, health_rows
from .suite_load import idle_rss_row, requirements_rows, throughput_rows, upload_rows

Scenario = Callable[[Context], list[Row]]

SCENARIOS: dict[str, tuple[str, Scenario]] = {
    "bwrap": ("baseline: a cold bwrap sandbox per run", bwrap_rows),
    "docker": ("baseline: a Docker container per run", docker_rows),
    "health": ("GET /health round trip", health_rows),
    "eval": ("eval hello-world, and the server's overhead per request", eval_rows),
    "exec_sync": ("exec/sync with a 10-file project", exec_sync_rows),
    "async": ("exec/async submit, then poll until finished", async_rows),
    "cold": ("cold paths: memory_mb=512, network on, another interpreter", cold_rows),
    "throughput": ("executions/s with concurrent clients", throughput_rows),
    "requirements": ("a cached-requirements run vs its first run", requirements_rows),
    "upload": ("100 MB and 1 GiB tar uploads, server RSS growth", upload_rows),
}


def run_suite(ctx: Context, only: set[str], progress: Callable[[str], None]) -> list[Row]:
    """Idle RSS, bare baselines, the chosen scenarios (all when ``only`` is empty), a drift
    check of the bare start, and the RSS once idle again."""
    rows = [idle_rss_row(ctx, "idle_rss", "server RSS, idle (start)")]
    rows += _guarded("bare", "baseline: bare interpreter starts", bare_rows, ctx, progress)
    for name, (title, scenario) in SCENARIOS.items():
        if not only or name in only:
            rows += _guarded(name, title, scenario, ctx, progress)
    rows += _guarded("bare_end", "drift check: bare start again", bare_end_rows, ctx, progress)
    if ctx.server.pid:
        wait_idle(ctx.server.pid, ctx.plan.idle_wait_seconds)
    rows.append(idle_rss_row(ctx, "idle_rss_after", "server RSS, idle (after load)"))
    return rows


def _guarded(
    name: str, title: str, scenario: Scenario, ctx: Context, progress: Callable[[str], None]
) -> list[Row]:
    started = time.monotonic()
    progress(f"{name}: {title} …")
    try:
        rows = scenario(ctx)
    except Exception as exc:
        traceback.print_exc()
        rows = [Row(name, title, skipped=f"failed: {exc}")]
    progress(f"{name}: done in {time.monotonic() - started:.1f} s")
    return rows
