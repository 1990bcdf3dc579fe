"""The speed issue's targets, checked against one run's rows.

Usage::

    for target in check_targets(rows): print(target.name, target.verdict)
"""

from __future__ import annotations

from collections.abc import Sequence

from .report import Row, Target, find, fmt_ms

P50_LIMIT, P99_LIMIT, COLD_LIMIT = 0.5, 2.0, 2.0
RUNS_PER_SECOND = 150.0
OVERHEAD_MS = 1.0
IDLE_RSS_MIB = 100.0
UPLOAD_MB_S, UPLOAD_RSS_MIB = 500.0, 64.0
COLD_KEYS = ("cold_memory", "cold_network", "cold_python")


def check_targets(rows: Sequence[Row]) -> list[Target]:
    return [
        *_latency_targets(rows),
        _throughput_target(rows),
        *(_cold_target(rows, key) for key in COLD_KEYS if _has(rows, key)),
        _overhead_target(rows),
        _idle_target(rows),
        *_upload_targets(rows),
    ]


def _has(rows: Sequence[Row], key: str) -> bool:
    return any(r.key == key for r in rows)


def _missing(name: str, limit: str) -> Target:
    return Target(name, "not measured", limit, None)


def _latency_targets(rows: Sequence[Row]) -> list[Target]:
    bare, row = find(rows, "bare"), find(rows, "eval")
    p50_name = "eval hello p50 vs a bare interpreter start (p50)"
    p99_name = "eval hello p99 vs a bare interpreter start (p50)"
    if not (bare and bare.latency and row and row.latency):
        return [_missing(p50_name, f"≤ {P50_LIMIT}x"), _missing(p99_name, f"≤ {P99_LIMIT}x")]
    base = bare.latency.p50
    p50, p99 = row.latency.p50 / base, row.latency.p99 / base
    p99_vs_p99 = row.latency.p99 / bare.latency.p99
    return [
        Target(p50_name, f"{fmt_ms(row.latency.p50)} = {p50:.2f}x {fmt_ms(base)}",
               f"≤ {P50_LIMIT}x", p50 <= P50_LIMIT),
        Target(p99_name, f"{fmt_ms(row.latency.p99)} = {p99:.2f}x (vs bare p99: "
               f"{p99_vs_p99:.2f}x)", f"≤ {P99_LIMIT}x", p99 <= P99_LIMIT),
    ]  # fmt: skip


def _throughput_target(rows: Sequence[Row]) -> Target:
    name, limit = "executions/s with 8 concurrent clients", f"≥ {RUNS_PER_SECOND:.0f}/s"
    row = find(rows, "throughput")
    if row is None or row.value is None:
        return _missing(name, limit)
    return Target(name, f"{row.value:.1f}/s", limit, row.value >= RUNS_PER_SECOND)


def _cold_target(rows: Sequence[Row], key: str) -> Target:
    row = find(rows, key)
    label = next(r.label for r in rows if r.key == key)
    name, limit = f"cold path p50 ({label.split(', ', 1)[-1]}) vs bare start", f"≤ {COLD_LIMIT}x"
    base = find(rows, row.baseline) if row else None
    if not (row and row.latency and base and base.latency):
        return _missing(name, limit)
    ratio = row.latency.p50 / base.latency.p50
    measured = f"{fmt_ms(row.latency.p50)} = {ratio:.2f}x {fmt_ms(base.latency.p50)}"
    return Target(name, measured, limit, ratio <= COLD_LIMIT)


def _overhead_target(rows: Sequence[Row]) -> Target:
    """Judged on the server's own measurement (Server-Timing); the client's view, which
    adds loopback and the client's wake-up on the same two cores, is shown beside it."""
    name, limit = "server overhead per request (p50)", f"≤ {OVERHEAD_MS:g} ms"
    own, seen = find(rows, "server_overhead"), find(rows, "overhead")
    if own is None or own.latency is None:
        return _missing(name, limit)
    measured = f"{fmt_ms(own.latency.p50)} in the server"
    if seen is not None and seen.latency is not None:
        measured += f" ({fmt_ms(seen.latency.p50)} seen by the client)"
    return Target(name, measured, limit, own.latency.p50 <= OVERHEAD_MS)


def _idle_target(rows: Sequence[Row]) -> Target:
    name, limit = "server idle RSS", f"≤ {IDLE_RSS_MIB:g} MiB"
    row = find(rows, "idle_rss")
    if row is None or row.value is None:
        return _missing(name, limit)
    return Target(name, f"{row.value:.1f} MiB", limit, row.value <= IDLE_RSS_MIB)


def _upload_targets(rows: Sequence[Row]) -> list[Target]:
    speed, memory = "1 GiB tar upload through exec/async", "server RSS growth during it"
    speed_limit, memory_limit = f"≥ {UPLOAD_MB_S:g} MB/s", f"< {UPLOAD_RSS_MIB:g} MiB"
    row = find(rows, "upload_1GiB")
    if row is None or row.value is None:
        return [_missing(speed, speed_limit), _missing(memory, memory_limit)]
    growth = row.extra.get("rss_growth_mib")
    grown = _missing(memory, memory_limit)
    if growth is not None:
        grown = Target(memory, f"{growth:.1f} MiB", memory_limit, growth < UPLOAD_RSS_MIB)
    return [Target(speed, f"{row.value:.0f} MB/s", speed_limit, row.value >= UPLOAD_MB_S), grown]
