"""The execution lifecycle, checked in one place.

``pending → running → completed | failed | killed``, plus ``pending → killed``
(a DELETE before it started) and ``pending → failed`` (it could not start:
restart recovery, a failed set-up). Every status change in the service goes
through ``allowed_from`` so that an illegal one is a bug that shows.
"""

from __future__ import annotations

from python_executor_client.models import ExecutionStatus

PENDING = ExecutionStatus.PENDING
RUNNING = ExecutionStatus.RUNNING
COMPLETED = ExecutionStatus.COMPLETED
FAILED = ExecutionStatus.FAILED
KILLED = ExecutionStatus.KILLED

_TRANSITIONS: dict[ExecutionStatus, frozenset[ExecutionStatus]] = {
    PENDING: frozenset({RUNNING, KILLED, FAILED}),
    RUNNING: frozenset({COMPLETED, FAILED, KILLED}),
    COMPLETED: frozenset(),
    FAILED: frozenset(),
    KILLED: frozenset(),
}

UNFINISHED = frozenset({PENDING, RUNNING})


def allowed_from(target: ExecutionStatus) -> frozenset[ExecutionStatus]:
    """The statuses from which ``target`` may be entered."""
    return frozenset(src for src, dsts in _TRANSITIONS.items() if target in dsts)


def can_transition(source: ExecutionStatus, target: ExecutionStatus) -> bool:
    return target in _TRANSITIONS[source]
