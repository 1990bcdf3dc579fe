"""Throughput with concurrent clients, cached requirements, big uploads, idle memory."""

from __future__ import annotations

import contextlib
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx2

from .calls import (
    HELLO,
    Call,
    Context,
    describe_failure,
    joined,
    pool_watch,
    timed,
    wait_finished,
)
from .loadgen import run_load
from .payloads import MB, StreamedUpload
from .plan import GiB
from .procmem import RssWatch, rss_mib, tree_rss_mib
from .report import Row
from .stats import bounded, percentile, summarize
from .suite_latency import Failures

UPLOAD_TIMEOUT = 600.0
REQUIREMENT_CODE = "import six\nprint(six.__name__)"


# --- throughput ---------------------------------------------------------------------


def _hello_ran(status: int, body: dict[str, Any]) -> str | None:
    call = Call(0.0, status, body)
    return None if call.ok_run("hello\n") else describe_failure(call)


def throughput_rows(ctx: Context) -> list[Row]:
    plan = ctx.plan
    with pool_watch(ctx.client) as pool:
        load = run_load(
            ctx.server.url,
            "/api/v1/eval",
            HELLO,
            clients=plan.clients,
            seconds=plan.throughput_seconds,
            check=_hello_ran,
        )
    if not load.latencies:
        raise RuntimeError(f"no run succeeded: {load.failures[:1]}")
    elapsed = load.elapsed
    rate = len(load.latencies) / elapsed
    note = joined(
        f"{len(load.latencies)} runs in {elapsed:.1f} s, keep-alive connections driven by"
        " one client thread (loadgen.py); latency under load",
        pool.note(),
        f"first failure: {load.failures[0]}" if load.failures else "",
    )
    label = f"eval, {plan.clients} concurrent clients"
    row = Row("throughput", label, latency=summarize(load.latencies), value=rate, unit="runs/s")
    row.baseline, row.note, row.errors = "bare_parallel", note, len(load.failures)
    return [row]


# --- requirements -------------------------------------------------------------------


def requirements_rows(ctx: Context) -> list[Row]:
    body = {"code": REQUIREMENT_CODE, "requirements_txt": "six"}
    post = ctx.client.post
    first = timed(lambda: post("/api/v1/eval", json=body, timeout=UPLOAD_TIMEOUT))
    if not first.ok_run("six\n"):
        raise RuntimeError(f"the install run failed: {describe_failure(first)}")
    cached: list[float] = []
    plain: list[float] = []
    failures = Failures()
    with pool_watch(ctx.client) as pool:
        for _ in bounded(ctx.plan.requirement_runs, ctx.plan.loop_seconds):
            _requirement_pair(ctx, body, cached, plain, failures)
    if not cached or not plain:
        raise RuntimeError(f"no cached or no plain run succeeded: {failures.first}")
    extra = percentile(cached, 50) - percentile(plain, 50)
    plain_row = Row("req_plain", "eval, no requirements", baseline="bare")
    plain_row.latency, plain_row.note = summarize(plain), "interleaved with the cached runs"
    cached_row = Row("req_cached", "eval six, cached requirements")
    cached_row.latency, cached_row.baseline = summarize(cached), "req_plain"
    cached_row.errors = failures.count
    cached_row.note = failures.note(
        joined(
            "requirements_txt six, `import six`",
            f"extra cost over no requirements {extra:+.1f} ms p50",
            pool.note() + " (both kinds)" if pool.note() else "",
        )
    )
    first_row = Row("req_first", "eval six, first run (install)", baseline="req_cached")
    first_row.latency = summarize([first.ms])
    first_row.note = (
        "a fresh data dir: nothing cached yet"
        if ctx.server.managed
        else "an attached server may have six cached already"
    )
    return [plain_row, cached_row, first_row]


def _requirement_pair(
    ctx: Context, body: dict[str, str], cached: list[float], plain: list[float], failures: Failures
) -> None:
    """One cached-requirements run, then one plain run: both see the same conditions."""
    again = ctx.calls.post("/api/v1/eval", body)
    bare = ctx.calls.post("/api/v1/eval", HELLO)
    for call, out, samples in ((again, "six\n", cached), (bare, "hello\n", plain)):
        if call.ok_run(out):
            samples.append(call.ms)
        else:
            failures.add(call)


# --- uploads ------------------------------------------------------------------------


@dataclass
class _Upload:
    upload_ms: float
    e2e_ms: float
    rss_start: float | None
    rss_peak: float | None
    rss_growth: float | None


def size_name(size: int) -> str:
    return f"{size / GiB:g} GiB" if size >= GiB else f"{size / MB:g} MB"


def upload_rows(ctx: Context) -> list[Row]:
    rows: list[Row] = []
    for size in ctx.plan.upload_sizes:
        rows += _upload_size_rows(ctx, size)
    return rows


def _upload_size_rows(ctx: Context, size: int) -> list[Row]:
    name, tag = size_name(size), size_name(size).replace(" ", "")
    repeats = ctx.plan.upload_repeats
    rates = [_disk_rate(ctx.scratch_dir, size) for _ in range(repeats)]
    disk = Row(
        f"disk_{tag}",
        f"disk write {name}",
        unit="MB/s",
        note=f"the data dir's disk, no fsync; median of {repeats}: "
        + ", ".join(f"{rate:.0f}" for rate in rates),
    )
    disk.value = percentile(rates, 50)
    try:
        samples = [_upload_once(ctx, size) for _ in bounded(repeats, 3 * ctx.plan.loop_seconds)]
    except (RuntimeError, httpx2.HTTPError) as exc:
        return [disk, Row(f"upload_{tag}", f"exec/async upload {name}", skipped=str(exc))]
    tar_mb = StreamedUpload(size, {}).tar_size / MB
    upload_p50 = percentile([s.upload_ms for s in samples], 50)
    row = Row(f"upload_{tag}", f"exec/async upload {name}", unit="MB/s")
    row.latency = summarize([s.upload_ms for s in samples])
    row.value, row.baseline = tar_mb / (upload_p50 / 1000), disk.key
    growths = [s.rss_growth for s in samples if s.rss_growth is not None]
    row.note, row.extra = _upload_note(samples), {"samples": [s.__dict__ for s in samples]}
    row.extra["rss_growth_mib"] = max(growths) if growths else None
    return [disk, row]


def _upload_note(samples: list[_Upload]) -> str:
    worst = max(samples, key=lambda s: s.rss_growth or 0.0)
    e2e = percentile([s.e2e_ms for s in samples], 50)
    if worst.rss_growth is None:
        rss = "server RSS not readable"
    else:
        rss = (
            f"server RSS +{worst.rss_growth:.1f} MiB over upload and run "
            f"({worst.rss_start:.0f} → {worst.rss_peak:.0f} MiB)"
        )
    return f"time to 202; {rss}; run finished {e2e:.0f} ms after the upload began"


def _upload_once(ctx: Context, size: int) -> _Upload:
    body = StreamedUpload(size, {"entrypoint": "main.py", "config": {"timeout_seconds": 300}})
    pid = ctx.server.pid
    started = time.perf_counter()
    with RssWatch(pid) if pid else contextlib.nullcontext() as watch:
        call = timed(lambda: _post_upload(ctx, body))
        if call.status_code != 202:
            raise RuntimeError(f"upload of {size_name(size)}: {describe_failure(call)}")
        result, _ = wait_finished(ctx.client, call.body["execution_id"], 0.05, UPLOAD_TIMEOUT)
    if result.get("stdout") != f"{body.data_size}\n":
        raise RuntimeError(f"the {size_name(size)} run did not see its file: {str(result)[:300]}")
    e2e = (time.perf_counter() - started) * 1000
    if watch is None:
        return _Upload(call.ms, e2e, None, None, None)
    return _Upload(call.ms, e2e, watch.start_mib, watch.peak_mib, watch.growth_mib)


def _post_upload(ctx: Context, body: StreamedUpload) -> httpx2.Response:
    return ctx.client.post(
        "/api/v1/exec/async", content=body.chunks(), headers=body.headers, timeout=UPLOAD_TIMEOUT
    )


def _disk_rate(directory: Path, size: int) -> float:
    block = os.urandom(1024 * 1024)
    with tempfile.NamedTemporaryFile(dir=directory, prefix="pyexec-bench-disk-") as f:
        started = time.perf_counter()
        left = size
        while left > 0:
            left -= f.write(block[: min(left, len(block))])
        f.flush()
        elapsed = time.perf_counter() - started
    return size / MB / elapsed


# --- memory -------------------------------------------------------------------------


def idle_rss_row(ctx: Context, key: str, label: str) -> Row:
    pid = ctx.server.pid
    if pid is None:
        return Row(key, label, skipped="the server's pid is unknown (not on this machine?)")
    rss = rss_mib(pid)
    tree = tree_rss_mib(pid)
    note = f"pid {pid}; with its child processes {tree:.1f} MiB"
    return Row(key, label, value=rss, unit="MiB", note=note, extra={"tree_rss_mib": tree})
