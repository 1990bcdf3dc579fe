"""benchmarks/run.py's helpers on fixed inputs: percentiles, bounded loops, the table and
the target checks. No timings are asserted; nothing is started."""

from __future__ import annotations

import http.server
import importlib.util
import json
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

BENCHMARKS = Path(__file__).resolve().parents[4] / "benchmarks"


@pytest.fixture(scope="module")
def bench() -> Iterator[ModuleType]:
    with pytest.MonkeyPatch.context() as patch:
        patch.syspath_prepend(str(BENCHMARKS))  # run.py imports its pyexec_bench package
        spec = importlib.util.spec_from_file_location("pyexec_bench_run", BENCHMARKS / "run.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        yield module
    for name in [n for n in sys.modules if n == "pyexec_bench" or n.startswith("pyexec_bench.")]:
        del sys.modules[name]


def test_percentile_interpolates_between_ranks(bench: ModuleType) -> None:
    assert bench.percentile([4.0, 1.0, 3.0, 2.0], 50) == 2.5
    assert bench.percentile([7.0], 99) == 7.0
    assert bench.percentile([float(i) for i in range(1, 101)], 99) == pytest.approx(99.01)
    assert bench.percentile([1.0, 2.0, 3.0], 0) == 1.0
    assert bench.percentile([1.0, 2.0, 3.0], 100) == 3.0


@pytest.mark.parametrize(("samples", "q"), [([], 50), ([1.0], -1), ([1.0], 101)])
def test_percentile_rejects_bad_input(bench: ModuleType, samples: list[float], q: float) -> None:
    with pytest.raises(ValueError):
        bench.percentile(samples, q)


def test_summarize(bench: ModuleType) -> None:
    summary = bench.summarize([3.0, 1.0, 2.0])
    assert (summary.n, summary.p50, summary.mean, summary.min, summary.max) == (3, 2, 2, 1, 3)


def test_bounded_stops_at_the_count_and_always_runs_once(bench: ModuleType) -> None:
    assert list(bench.bounded(count=3, seconds=3600)) == [0, 1, 2]
    assert list(bench.bounded(count=1_000_000, seconds=0)) == [0]


def _rows(bench: ModuleType) -> list[object]:
    row = bench.Row
    return [
        row("bare", "bare python", latency=bench.summarize([10.0, 10.0, 10.0])),
        row("eval", "eval hello", latency=bench.summarize([5.0, 5.0, 20.0]), baseline="bare"),
        row("bare_parallel", "bare x8", value=300.0, unit="runs/s"),
        row("throughput", "8 clients", value=150.0, unit="runs/s", baseline="bare_parallel"),
        row("docker", "docker run", skipped="no Docker engine answers"),
    ]


def test_markdown_table(bench: ModuleType) -> None:
    lines = bench.markdown_table(_rows(bench)).splitlines()
    assert lines[0].startswith("| Benchmark | n | p50 | p99 |")
    assert len(lines) == 2 + 5
    eval_line = next(line for line in lines if line.startswith("| eval hello"))
    assert "| 5.00 ms |" in eval_line
    assert "| 0.50x / 1.97x |" in eval_line  # p50 5 / 10, p99 19.7 / 10
    assert "| 150 runs/s |" in next(line for line in lines if line.startswith("| 8 clients"))
    assert "| 0.50x |" in next(line for line in lines if line.startswith("| 8 clients"))
    assert "skipped: no Docker engine answers" in lines[-1]


def test_targets(bench: ModuleType) -> None:
    found = {t.name: t for t in bench.check_targets(_rows(bench))}
    assert found["eval hello p50 vs a bare interpreter start (p50)"].ok is True
    assert found["executions/s with 8 concurrent clients"].ok is True
    assert found["server idle RSS"].ok is None  # not measured
    assert "not measured" in bench.targets_table(list(found.values()))


def test_the_overhead_target_is_judged_in_the_server_and_shows_the_client_view(
    bench: ModuleType,
) -> None:
    row, name = bench.Row, "server overhead per request (p50)"
    seen = row("overhead", "overhead", latency=bench.summarize([1.4, 1.5, 1.6]))
    own = row("server_overhead", "in the server", latency=bench.summarize([0.7, 0.8, 0.9]))
    found = {t.name: t for t in bench.check_targets([seen, own])}[name]
    assert found.ok is True
    assert found.measured == "0.80 ms in the server (1.50 ms seen by the client)"
    slow = row("server_overhead", "in the server", latency=bench.summarize([1.1, 1.2]))
    assert {t.name: t for t in bench.check_targets([seen, slow])}[name].ok is False
    assert {t.name: t for t in bench.check_targets([seen])}[name].ok is None


def test_only_accepts_known_scenarios(bench: ModuleType) -> None:
    assert bench.parse_args(["--only", "eval,throughput", "--quick"]).only == [
        {"eval", "throughput"}
    ]
    with pytest.raises(SystemExit):
        bench.parse_args(["--only", "no-such-scenario"])


@pytest.fixture(scope="module")
def loadgen(bench: ModuleType) -> ModuleType:
    return sys.modules["pyexec_bench.loadgen"]  # imported by run.py


def test_loadgen_reads_a_response_only_once_it_is_complete(loadgen: ModuleType) -> None:
    first = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}"
    second = b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 4\r\n\r\nbusy"
    buffer = bytearray(first[:-1])
    assert loadgen.read_response(buffer) is None  # the body's last byte is missing
    buffer += first[-1:] + second[:20]
    assert loadgen.read_response(buffer) == (200, b"{}")
    assert buffer == second[:20]  # the next response's start stays
    buffer += second[20:]
    assert loadgen.read_response(buffer) == (503, b"busy")
    assert buffer == b""


def test_server_timing_is_read_from_a_response_head(bench: ModuleType) -> None:
    calls = sys.modules["pyexec_bench.calls"]
    head = b"http/1.1 200 ok\r\nserver-timing: total;dur=5.912, run;dur=4.903\r\nx: y"
    assert calls.server_timing(head) == {"total": 5.912, "run": 4.903}
    assert calls.server_timing(b"http/1.1 200 ok\r\ncontent-length: 2") == {}


class _Answers(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive
    served = 0
    lock = threading.Lock()  # one thread per connection

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers["Content-Length"]))
        with self.lock:
            type(self).served += 1
            good = type(self).served % 3 != 0
        body = json.dumps({"status": "completed" if good else "failed"}).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


def test_loadgen_keeps_every_connection_busy_and_checks_each_answer(loadgen: ModuleType) -> None:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Answers)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:

        def check(status: int, body: dict[str, object]) -> str | None:
            return None if status == 200 and body.get("status") == "completed" else "failed"

        url = f"http://127.0.0.1:{server.server_address[1]}"
        load = loadgen.run_load(url, "/x", {"code": "1"}, clients=3, seconds=0.3, check=check)
    finally:
        server.shutdown()
        server.server_close()
    answered = len(load.latencies) + len(load.failures)
    assert answered == _Answers.served - 3  # every answer after the warm-up, counted once
    assert load.failures == ["failed"] * len(load.failures)
    assert abs(len(load.failures) - answered / 3) <= 1  # every third answer failed the check
    assert load.elapsed >= 0.3
