"""The client's exception tree. Catch ``PythonExecutorError`` to catch them all.

::

    PythonExecutorError
    ├── InvalidInput          (also ValueError) nothing to send, a missing path, a bad option
    ├── ConnectionFailed      the server could not be reached, or the connection broke
    ├── ExecutionTimeout      (also TimeoutError) ``max_wait`` ran out, or no answer in time
    ├── ProtocolError         the server answered something the contract does not allow
    └── ServerError           the server answered with an error status and ``{"error": ...}``
        ├── BadRequest        400
        ├── NotFound          404  unknown execution id
        ├── PayloadTooLarge   413
        └── ServerBusy        503  queue full; ``retry_after`` seconds

Usage::

    try:
        client.get_execution(execution_id)
    except NotFound as exc:
        print(exc.status_code, exc.message)
"""

from __future__ import annotations

__all__ = [
    "BadRequest",
    "ConnectionFailed",
    "ExecutionTimeout",
    "InvalidInput",
    "NotFound",
    "PayloadTooLarge",
    "ProtocolError",
    "PythonExecutorError",
    "ServerBusy",
    "ServerError",
]


class PythonExecutorError(Exception):
    """Base of every error this client raises."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidInput(PythonExecutorError, ValueError):
    pass


class ConnectionFailed(PythonExecutorError):
    pass


class ExecutionTimeout(PythonExecutorError, TimeoutError):
    pass


class ProtocolError(PythonExecutorError):
    pass


class ServerError(PythonExecutorError):
    """The server refused or failed a request; ``message`` is its own ``error`` text."""

    def __init__(self, status_code: int, message: str) -> None:
        super().__init__(message)
        self.status_code = status_code

    def __str__(self) -> str:
        return f"{self.message} (HTTP {self.status_code})"


class BadRequest(ServerError):
    pass


class NotFound(ServerError):
    pass


class PayloadTooLarge(ServerError):
    pass


class ServerBusy(ServerError):
    def __init__(self, status_code: int, message: str, retry_after: float | None = None) -> None:
        super().__init__(status_code, message)
        self.retry_after = retry_after
