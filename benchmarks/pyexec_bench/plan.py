"""How much of each measurement a run takes: the default plan (a few minutes on 2 cores)
and ``--quick`` (under a minute). Every loop is bounded by a count and by seconds."""

from __future__ import annotations

from dataclasses import dataclass

from .payloads import MB, MiB

GiB = 1024 * MiB


@dataclass(frozen=True)
class Plan:
    name: str
    bare_runs: int = 40
    bwrap_runs: int = 30
    docker_runs: int = 12
    parallel_seconds: float = 5.0
    health_requests: int = 300
    eval_requests: int = 300
    throughput_seconds: float = 10.0
    clients: int = 8
    exec_requests: int = 60
    async_requests: int = 40
    cold_requests: int = 25
    requirement_runs: int = 12
    upload_sizes: tuple[int, ...] = (100 * MB, GiB)
    upload_repeats: int = 3  # each size, and its disk-write baseline: the median is reported
    loop_seconds: float = 20.0  # cap of each count-bounded loop
    idle_wait_seconds: float = 30.0


FULL = Plan(name="full")
QUICK = Plan(
    name="quick",
    bare_runs=20,
    bwrap_runs=15,
    docker_runs=4,
    parallel_seconds=2.0,
    health_requests=100,
    eval_requests=60,
    throughput_seconds=3.0,
    exec_requests=15,
    async_requests=10,
    cold_requests=8,
    requirement_runs=4,
    upload_sizes=(100 * MB,),
    upload_repeats=1,
    loop_seconds=6.0,
    idle_wait_seconds=10.0,
)
