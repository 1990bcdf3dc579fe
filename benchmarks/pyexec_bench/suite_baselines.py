"""Baseline rows: what the service is compared with, measured in the same run."""

from __future__ import annotations

import tempfile
from pathlib import Path

from .baselines import (
    PASS,
    BwrapCold,
    docker_argv,
    docker_ready,
    interpreter_for,
    parallel_rate,
    python_version_of,
    time_command,
)
from .calls import Context
from .payloads import TEN_FILE_OUTPUT, ten_file_project
from .report import Row
from .stats import summarize


def _exe(version: str) -> Path:
    exe = interpreter_for(version)
    if exe is None:
        raise RuntimeError(f"no python{version} found on this machine")
    return exe


def bare_rows(ctx: Context) -> list[Row]:
    plan, exe = ctx.plan, _exe(ctx.default_python)
    label = f"bare python{ctx.default_python} -I -S -c pass"
    ms = time_command([str(exe), *PASS], plan.bare_runs, plan.loop_seconds)
    rows = [Row("bare", label, latency=summarize(ms), note=f"{exe} ({python_version_of(exe)})")]
    try:
        rows.append(_bare_project(ctx, exe))
    except RuntimeError as exc:
        rows.append(Row("bare_project", "bare python, 10-file project", skipped=str(exc)))
    if ctx.other_python:
        other = _exe(ctx.other_python)
        ms = time_command([str(other), *PASS], plan.bare_runs, plan.loop_seconds)
        label = f"bare python{ctx.other_python} -I -S -c pass"
        rows.append(Row("bare_other", label, latency=summarize(ms), note=str(other)))
    rate = parallel_rate([str(exe), *PASS], plan.clients, plan.parallel_seconds)
    label = f"bare python{ctx.default_python}, {plan.clients} in parallel"
    rows.append(Row("bare_parallel", label, value=rate, unit="runs/s"))
    return rows


def _bare_project(ctx: Context, exe: Path) -> Row:
    with tempfile.TemporaryDirectory(prefix="pyexec-bench-project-") as top:
        for name, text in ten_file_project().items():
            (Path(top) / name).write_text(text)
        argv = [str(exe), "-I", "-S", str(Path(top) / "main.py")]
        ms = time_command(argv, ctx.plan.bare_runs, ctx.plan.loop_seconds)
    label = f"bare python{ctx.default_python}, 10-file project"
    note = f"-I -S main.py, prints {TEN_FILE_OUTPUT.strip()!r}"
    return Row("bare_project", label, latency=summarize(ms), note=note)


def bare_end_rows(ctx: Context) -> list[Row]:
    exe = _exe(ctx.default_python)
    ms = time_command([str(exe), *PASS], max(10, ctx.plan.bare_runs // 2), ctx.plan.loop_seconds)
    label = f"bare python{ctx.default_python}, end of run"
    return [Row("bare_end", label, latency=summarize(ms), baseline="bare", note="drift check")]


def bwrap_rows(ctx: Context) -> list[Row]:
    exe = _exe(ctx.default_python)
    with BwrapCold(exe) as cold:
        ms = time_command(cold.argv, ctx.plan.bwrap_runs, ctx.plan.loop_seconds)
        note = "; ".join(filter(None, [f"as uid {cold.uid}" if cold.root else "", cold.note]))
    label = f"bwrap cold, {cold.measured.name} -I -S -c pass"
    return [Row("bwrap", label, latency=summarize(ms), baseline="bare", note=note)]


def docker_rows(ctx: Context) -> list[Row]:
    label = "docker run --rm, python3 -c pass"
    reason = docker_ready(ctx.docker_image)
    if reason is not None:
        return [Row("docker", label, skipped=reason)]
    argv = docker_argv(ctx.docker_image)
    ms = time_command(argv, ctx.plan.docker_runs, ctx.plan.loop_seconds * 2, warmup=1)
    note = f"{ctx.docker_image}, --network none"
    return [Row("docker", label, latency=summarize(ms), baseline="bare", note=note)]
