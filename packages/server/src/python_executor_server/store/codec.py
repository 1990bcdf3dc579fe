"""Flat encodings of ``ExecutionRecord`` shared by the SQLite and Redis stores.

A *row* maps each record field to a scalar: datetimes as ISO 8601 text in UTC
(fixed width, so text order is time order), ``request`` as JSON, booleans as
0/1, ``None`` kept as ``None`` (SQLite NULL; Redis leaves the hash field out).
Decoding accepts what either backend gives back (Redis returns text only).

A *cursor* is the opaque position of a record in the newest-first listing.

Usage::

    row = record_to_row(record)
    assert record_from_row(row) == record
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Callable, Iterable, Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

from python_executor_client.models import ExecutionStatus

from ..errors import BadRequest
from .base import ExecutionRecord

Scalar = str | int | float | None

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MICROS_WIDTH = 16  # zero-padded: text order is numeric order until the year 2286


def to_iso(value: datetime) -> str:
    """``2026-11-26T14:00:00.123456+00:00``; naive datetimes are refused."""
    if value.tzinfo is None or value.utcoffset() is None:
        raise ValueError(f"naive datetime {value!r}: store times must carry a timezone")
    return value.astimezone(UTC).isoformat(timespec="microseconds")


def from_iso(text: str) -> datetime:
    return datetime.fromisoformat(text).astimezone(UTC)


def to_micros(value: datetime) -> int:
    return (value - _EPOCH) // timedelta(microseconds=1)


def sort_key(created_at: datetime, execution_id: str) -> str:
    """The listing position as text: ordering these strings orders the records."""
    return f"{to_micros(created_at):0{_MICROS_WIDTH}d}:{execution_id}"


def encode_cursor(created_at: datetime, execution_id: str) -> str:
    return cursor_from_key(sort_key(created_at, execution_id))


def cursor_from_key(key: str) -> str:
    return base64.urlsafe_b64encode(key.encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> str:
    """The ``sort_key`` a cursor stands for; ``BadRequest`` if it is not one of ours."""
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
    except (binascii.Error, UnicodeDecodeError, ValueError):
        raise BadRequest(f"invalid cursor {cursor!r}") from None
    micros, sep, execution_id = raw.partition(":")
    if not (sep and execution_id and len(micros) == _MICROS_WIDTH and micros.isdigit()):
        raise BadRequest(f"invalid cursor {cursor!r}")
    return raw


def cursor_bounds(cursor: str) -> tuple[datetime, str]:
    """``(created_at, execution_id)`` of the record a cursor points after."""
    micros, _, execution_id = decode_cursor(cursor).partition(":")
    return _EPOCH + timedelta(microseconds=int(micros)), execution_id


def _dump_json(value: Mapping[str, Any]) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def _to_bool(value: Any) -> bool:
    return bool(int(value))


_ENCODERS: dict[str, Callable[[Any], Scalar]] = {
    "datetime": to_iso,
    "json": _dump_json,
    "bool": int,
    "status": lambda s: ExecutionStatus(s).value,
    "int": int,
    "float": float,
    "text": str,
}
_DECODERS: dict[str, Callable[[Any], Any]] = {
    "datetime": from_iso,
    "json": json.loads,
    "bool": _to_bool,
    "status": ExecutionStatus,
    "int": int,
    "float": float,
    "text": str,
}

# Every field of ExecutionRecord, in declaration order (the SQLite column order).
FIELD_KINDS: dict[str, str] = {
    "execution_id": "text",
    "status": "status",
    "created_at": "datetime",
    "request": "json",
    "stdout": "text",
    "stderr": "text",
    "exit_code": "int",
    "error": "text",
    "error_type": "text",
    "error_line": "int",
    "result": "text",
    "started_at": "datetime",
    "finished_at": "datetime",
    "duration_ms": "int",
    "stdout_truncated": "bool",
    "stderr_truncated": "bool",
    "cpu_ms": "int",
    "peak_memory_mb": "float",
}
FIELDS = tuple(FIELD_KINDS)


# Set when a record is created and never changed by a transition (``StateStore``).
FIXED_FIELDS = ("execution_id", "created_at", "request")


def record_values(record: ExecutionRecord, names: Iterable[str]) -> tuple[Scalar, ...]:
    """The encoded values of ``names`` (a row's columns), in that order."""
    values = []
    for name in names:
        value = getattr(record, name)
        values.append(None if value is None else _ENCODERS[FIELD_KINDS[name]](value))
    return tuple(values)


def record_to_row(record: ExecutionRecord) -> dict[str, Scalar]:
    return dict(zip(FIELDS, record_values(record, FIELDS), strict=True))


def record_from_row(row: Mapping[str, Any]) -> ExecutionRecord:
    """Build a record from a row; fields missing from ``row`` are None."""
    values: dict[str, Any] = {}
    for name, kind in FIELD_KINDS.items():
        value = row.get(name)
        values[name] = None if value is None else _DECODERS[kind](value)
    return ExecutionRecord(**values)


def check_times(record: ExecutionRecord) -> None:
    """Refuse naive datetimes, as the serializing stores do (one contract for all)."""
    for value in (record.created_at, record.started_at, record.finished_at):
        if value is not None:
            to_iso(value)


def check_same_id(execution_id: str, record: ExecutionRecord) -> None:
    if record.execution_id != execution_id:
        raise ValueError(f"transition of {execution_id!r} got a record for {record.execution_id!r}")
