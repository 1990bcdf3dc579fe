"""The ``Server-Timing`` header of an eval's answer: how long the request was in the
server, and how long of that the run took.

Usage::

    began = scope.get(BEGAN) or time.perf_counter()
    ...
    headers.append(server_timing(began, result.started_at, result.finished_at))
"""

from __future__ import annotations

import time
from datetime import datetime

# scope key: perf_counter() when the request's first bytes were read (our HTTP protocol)
BEGAN = "python_executor.began"
_SERVER_TIMING = b"server-timing"


def server_timing(
    began: float, started: datetime | None, finished: datetime | None
) -> tuple[bytes, bytes]:
    """``Server-Timing: total;dur=<ms>, run;dur=<ms>``: from the request's first bytes read
    to its answer (about to be written), and the run's span (``started_at`` →
    ``finished_at``); what the server spends on the rest (HTTP, validation, queue, store)
    is the difference. Milliseconds with microseconds."""
    total = f"total;dur={(time.perf_counter() - began) * 1000:.3f}"
    if started is None or finished is None:
        return _SERVER_TIMING, total.encode()
    run = (finished - started).total_seconds() * 1000
    return _SERVER_TIMING, f"{total}, run;dur={run:.3f}".encode()
