"""Wire models of the python-executor HTTP API.

This module is the one place where JSON field names of the wire contract are
spelled (see ``shared/API.md``). The server validates requests and renders
responses with these same models, so client and server cannot drift apart.

Usage::

    from python_executor_client.models import Metadata, ExecutionConfig
    meta = Metadata(entrypoint="main.py", config=ExecutionConfig(timeout_seconds=10))
    body = meta.model_dump_json(exclude_none=True)
"""

from __future__ import annotations

from datetime import UTC, datetime
from enum import Enum, StrEnum
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, PlainSerializer, field_validator

__all__ = [
    "METADATA_FIELD",
    "TAR_FIELD",
    "ErrorResponse",
    "EvalFile",
    "EvalRequest",
    "ExecutionConfig",
    "ExecutionList",
    "ExecutionResult",
    "ExecutionStatus",
    "ExecutionUsage",
    "KillResponse",
    "LogChunk",
    "LogEventType",
    "Metadata",
    "SubmitResponse",
    "format_timestamp",
]


class ExecutionStatus(str, Enum):
    """Lifecycle of an execution: pending → running → completed | failed | killed."""

    PENDING = "pending"
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    KILLED = "killed"

    @property
    def finished(self) -> bool:
        return self in (ExecutionStatus.COMPLETED, ExecutionStatus.FAILED, ExecutionStatus.KILLED)


def format_timestamp(value: datetime) -> str:
    """ISO 8601 UTC with a trailing ``Z`` and microseconds, as the contract wants."""
    if value.tzinfo is not None:
        value = value.astimezone(UTC).replace(tzinfo=None)
    return value.isoformat(timespec="microseconds") + "Z"


def _parse_timestamp(value: Any) -> Any:
    if isinstance(value, str) and value.endswith("Z"):
        return datetime.fromisoformat(value[:-1]).replace(tzinfo=UTC)
    return value


Timestamp = Annotated[datetime, PlainSerializer(format_timestamp, return_type=str)]


class ExecutionConfig(BaseModel):
    """Per-execution limits. ``None`` means: the server's default."""

    model_config = ConfigDict(extra="ignore")

    timeout_seconds: int | None = Field(None, description="Wall-clock limit of the whole run.")
    network_disabled: bool | None = Field(
        None, description="Network is off unless this is explicitly false."
    )
    memory_mb: int | None = Field(None, description="Memory limit of the whole process tree.")
    disk_mb: int | None = Field(None, description="How much the run may write (/work + /tmp).")
    cpu_shares: int | None = Field(None, description="Relative CPU weight.")

    def to_dict(self) -> dict[str, Any]:
        """The JSON object sent on the wire (the original client's spelling)."""
        return self.model_dump(mode="json", exclude_none=True)


class Metadata(BaseModel):
    """The ``metadata`` part of ``exec/sync`` and ``exec/async`` requests."""

    model_config = ConfigDict(extra="ignore")

    entrypoint: str | None = Field(
        None, description="File to run; default main.py, __main__.py, then the first .py file."
    )
    docker_image: str | None = None
    python_version: str | None = None
    requirements_txt: str | None = None
    pre_commands: list[str] | None = None
    stdin: str | None = None
    env_vars: list[str] | None = Field(None, description="KEY=value entries.")
    script_args: list[str] | None = None
    eval_last_expr: bool = False
    config: ExecutionConfig | None = None

    def to_dict(self) -> dict[str, Any]:
        """The JSON object sent on the wire (the original client's spelling)."""
        return self.model_dump(mode="json", exclude_none=True)


class EvalFile(BaseModel):
    name: str
    content: str


class EvalRequest(BaseModel):
    """Body of ``POST /api/v1/eval``. One of ``code`` / ``files`` is required."""

    model_config = ConfigDict(extra="ignore")

    code: str | None = None
    files: list[EvalFile] | None = None
    entrypoint: str | None = None
    stdin: str | None = None
    python_version: str | None = None
    docker_image: str | None = None
    eval_last_expr: bool = False
    requirements_txt: str | None = None
    env_vars: list[str] | None = None
    script_args: list[str] | None = None
    config: ExecutionConfig | None = None


class ExecutionUsage(BaseModel):
    cpu_ms: int | None = None
    peak_memory_mb: float | None = None


class ExecutionResult(BaseModel):
    """What the server knows about one execution."""

    model_config = ConfigDict(extra="ignore")

    execution_id: str
    status: ExecutionStatus
    stdout: str = ""
    stderr: str = ""
    exit_code: int | None = None
    error: str | None = None
    error_type: str | None = None
    error_line: int | None = None
    result: str | None = None
    started_at: Timestamp | None = None
    finished_at: Timestamp | None = None
    duration_ms: int | None = None
    stdout_truncated: bool = False
    stderr_truncated: bool = False
    usage: ExecutionUsage | None = None

    @field_validator("started_at", "finished_at", mode="before")
    @classmethod
    def _zulu(cls, value: Any) -> Any:
        return _parse_timestamp(value)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ExecutionResult:
        """Parse a decoded JSON response (the original client's spelling)."""
        return cls.model_validate(data)


class SubmitResponse(BaseModel):
    execution_id: str


class ExecutionList(BaseModel):
    executions: list[ExecutionResult]
    next_cursor: str | None = None


# Names of the two multipart fields of ``exec/sync`` and ``exec/async``.
TAR_FIELD = "tar"
METADATA_FIELD = "metadata"


class ErrorResponse(BaseModel):
    """Body of every error response."""

    error: str


class KillResponse(BaseModel):
    """Body of ``DELETE /executions/{id}``: ``killed``, or the status it already had."""

    status: str


class LogEventType(StrEnum):
    """Event names of the ``GET /executions/{id}/logs`` Server-Sent Events stream."""

    STDOUT = "stdout"
    STDERR = "stderr"
    EXIT = "exit"


class LogChunk(BaseModel):
    """Data of a ``stdout`` / ``stderr`` event; an ``exit`` event carries an ExecutionResult."""

    data: str
