"""Sequential round trips over one keep-alive connection: /health, eval hello-world
(and the server's overhead around the run), exec/sync, async submit + poll, cold paths."""

from __future__ import annotations

import os
import time
from typing import Any

from .calls import (
    HELLO,
    Call,
    Context,
    describe_failure,
    joined,
    pool_watch,
    run_span_ms,
    timed,
    wait_finished,
)
from .payloads import TEN_FILE_OUTPUT, multipart_files, tar_bytes, ten_file_project
from .procmem import CpuWatch
from .report import Row
from .stats import bounded, percentile, summarize

WARMUP = 5
ASYNC_POLL_SECONDS = 0.002


class Failures:
    """Counts failed calls and keeps the first reason."""

    def __init__(self) -> None:
        self.count = 0
        self.first = ""

    def add(self, call: Call) -> None:
        self.count += 1
        self.first = self.first or describe_failure(call)

    def note(self, note: str) -> str:
        return f"{note}; first failure: {self.first}" if self.first else note


def _require(samples: list[float], failures: Failures) -> None:
    if not samples:
        raise RuntimeError(f"every call failed: {failures.first}")


def health_rows(ctx: Context) -> list[Row]:
    for _ in range(WARMUP):
        ctx.calls.get("/health")
    samples = []
    for _ in bounded(ctx.plan.health_requests, ctx.plan.loop_seconds):
        samples.append(ctx.calls.get("/health").ms)
    return [Row("health", "GET /health", latency=summarize(samples))]


def _eval_calls(ctx: Context, body: dict[str, Any], count: int) -> tuple[list[Call], Failures]:
    calls, failures = [], Failures()
    for _ in range(WARMUP):
        ctx.calls.post("/api/v1/eval", body)
    for _ in bounded(count, ctx.plan.loop_seconds):
        call = ctx.calls.post("/api/v1/eval", body)
        if call.ok_run("hello\n"):
            calls.append(call)
        else:
            failures.add(call)
    _require([c.ms for c in calls], failures)
    return calls, failures


def eval_rows(ctx: Context) -> list[Row]:
    with pool_watch(ctx.client) as pool, CpuWatch(ctx.server.pid) as cpu_use:
        calls, failures = _eval_calls(ctx, HELLO, ctx.plan.eval_requests)
    spans = [run_span_ms(c.body) or 0.0 for c in calls]
    overheads = [c.ms - span for c, span in zip(calls, spans, strict=True)]
    # as the server measured it: first bytes read → answer written, minus the run
    own = [c.server_timing["total"] - c.server_timing["run"] for c in calls if _timed(c)]
    cpu = [c.body.get("usage", {}).get("cpu_ms") or 0 for c in calls]
    span_note = f"run span (started_at→finished_at) p50 {percentile(spans, 50):.1f} ms"
    eval_row = Row(
        "eval",
        "eval print('hello')",
        latency=summarize([c.ms for c in calls]),
        baseline="bare",
        note=failures.note(
            joined(
                f"sequential, keep-alive; {span_note}",
                f"sandbox cpu_ms p50 {percentile(cpu, 50):.0f}",
                pool.note(),
            )
        ),
        errors=failures.count,
        extra={"run_span_ms": summarize(spans).as_dict()},
    )
    overhead = Row(
        "overhead",
        "server overhead per eval",
        latency=summarize(overheads),
        baseline="health",
        note="eval round trip minus its run span, seen by the client: HTTP, validation, queue,"
        " store writes, and loopback and this client's own wake-up",
    )
    rows = [eval_row, overhead]
    if own:  # a server that sends Server-Timing
        rows.append(
            Row(
                "server_overhead",
                "server overhead per eval, in the server",
                latency=summarize(own),
                baseline="overhead",
                note="Server-Timing total minus run: from the request's first bytes read to its"
                " answer about to be written, minus the run span",
            )
        )
    return [*rows, _cpu_row(ctx, cpu_use, len(calls) + failures.count + WARMUP)]


def _timed(call: Call) -> bool:
    return "total" in call.server_timing and "run" in call.server_timing


def _cpu_row(ctx: Context, use: CpuWatch, runs: int) -> Row:
    """CPU per sequential eval, machine-wide: what bounds the runs/s of the whole machine."""
    per_run = 1000 * use.machine_s / runs
    cores = os.cpu_count() or 1
    note = (
        f"whole machine over the eval row, per run: server process {1000 * use.server_s / runs:.1f}"
        f" ms, sandboxes + zygotes + kernel threads {1000 * use.others_s / runs:.1f} ms, this"
        f" client {1000 * use.client_s / runs:.1f} ms; {cores} cores at this cost: at most"
        f" {cores * 1000 / per_run:.0f} runs/s"
    )
    if ctx.server.pid is None:
        note += " (the server's pid is unknown: its share is counted with the sandboxes')"
    return Row("eval_cpu", "CPU per eval", value=per_run, unit="ms", note=note)


def exec_sync_rows(ctx: Context) -> list[Row]:
    files = multipart_files(tar_bytes(ten_file_project()), {"entrypoint": "main.py"})
    samples, failures = [], Failures()
    with pool_watch(ctx.client) as pool:
        for i in bounded(WARMUP + ctx.plan.exec_requests, ctx.plan.loop_seconds):
            call = timed(lambda: ctx.client.post("/api/v1/exec/sync", files=files))
            if not call.ok_run(TEN_FILE_OUTPUT):
                failures.add(call)
            elif i >= WARMUP:
                samples.append(call.ms)
    _require(samples, failures)
    label = "exec/sync, 10-file project"
    note = failures.note(joined("multipart tar (built once, sent each time)", pool.note()))
    row = Row("exec_sync", label, latency=summarize(samples), baseline="bare_project", note=note)
    row.errors = failures.count
    return [row]


def async_rows(ctx: Context) -> list[Row]:
    files = multipart_files(tar_bytes(ten_file_project()), {"entrypoint": "main.py"})
    totals, submits, polls, failures = [], [], [], Failures()
    with pool_watch(ctx.client) as pool:
        for _ in bounded(ctx.plan.async_requests, ctx.plan.loop_seconds):
            submit, done, gets = _submit_and_wait(ctx, files)
            if done is None or not done.ok_run(TEN_FILE_OUTPUT):
                failures.add(done or submit)
                continue
            totals.append(done.ms)
            submits.append(submit.ms)
            polls.append(gets)
    _require(totals, failures)
    note = joined(
        f"submit (202) p50 {percentile(submits, 50):.1f} ms",
        f"GET every {ASYNC_POLL_SECONDS * 1000:.0f} ms, {sum(polls) / len(polls):.1f} GETs per run",
        pool.note(),
    )
    label = "exec/async + poll GET, 10-file project"
    row = Row("async", label, latency=summarize(totals), baseline="bare_project")
    row.note, row.errors = failures.note(note), failures.count
    return [row]


def _submit_and_wait(ctx: Context, files: dict[str, Any]) -> tuple[Call, Call | None, int]:
    """(the submit, the finished result timed from submit to the GET that saw it, GETs)."""
    started = time.perf_counter()
    submit = timed(lambda: ctx.client.post("/api/v1/exec/async", files=files))
    execution_id = submit.body.get("execution_id")
    if submit.status_code != 202 or not execution_id:
        return submit, None, 0
    result, polls = wait_finished(ctx.client, execution_id, ASYNC_POLL_SECONDS, 60)
    total = (time.perf_counter() - started) * 1000
    return submit, Call(total, 200, result), polls


def cold_rows(ctx: Context) -> list[Row]:
    variants: list[tuple[str, str, dict[str, Any], str]] = [
        ("cold_memory", "eval, memory_mb=512", {"config": {"memory_mb": 512}}, "bare"),
        ("cold_network", "eval, network on", {"config": {"network_disabled": False}}, "bare"),
    ]
    if ctx.other_python:
        label = f"eval, python_version={ctx.other_python}"
        variants.append(("cold_python", label, {"python_version": ctx.other_python}, "bare_other"))
    return [_cold_row(ctx, *variant) for variant in variants]


def _cold_row(ctx: Context, key: str, label: str, extra: dict[str, Any], base: str) -> Row:
    try:
        with pool_watch(ctx.client) as pool:
            calls, failures = _eval_calls(ctx, {**HELLO, **extra}, ctx.plan.cold_requests)
    except RuntimeError as exc:
        return Row(key, label, skipped=str(exc))
    spans = [run_span_ms(c.body) or 0.0 for c in calls]
    note = failures.note(joined(f"run span p50 {percentile(spans, 50):.1f} ms", pool.note()))
    row = Row(key, label, latency=summarize([c.ms for c in calls]), baseline=base, note=note)
    row.errors = failures.count
    return row
