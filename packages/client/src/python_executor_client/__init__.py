"""Python client of the python-executor service, sync and async.

Usage::

    from python_executor_client import PythonExecutorClient

    client = PythonExecutorClient("http://localhost:8080")
    result = client.execute_sync(files={"main.py": "print('Hello')"})
    print(result.stdout)          # Hello
    print(client.eval("6 * 7").result)   # 42
"""

from __future__ import annotations

from ._async_client import AsyncPythonExecutorClient
from ._client import PythonExecutorClient
from ._follow import LogEvent
from ._options import EvalOptions, RunOptions
from ._packing import detect_entrypoint
from ._version import __version__
from .errors import (
    BadRequest,
    ConnectionFailed,
    ExecutionTimeout,
    InvalidInput,
    NotFound,
    PayloadTooLarge,
    ProtocolError,
    PythonExecutorError,
    ServerBusy,
    ServerError,
)
from .models import (
    EvalFile,
    EvalRequest,
    ExecutionConfig,
    ExecutionList,
    ExecutionResult,
    ExecutionStatus,
    ExecutionUsage,
    LogEventType,
    Metadata,
)

__all__ = [
    "AsyncPythonExecutorClient",
    "BadRequest",
    "ConnectionFailed",
    "EvalFile",
    "EvalOptions",
    "EvalRequest",
    "ExecutionConfig",
    "ExecutionList",
    "ExecutionResult",
    "ExecutionStatus",
    "ExecutionTimeout",
    "ExecutionUsage",
    "InvalidInput",
    "LogEvent",
    "LogEventType",
    "Metadata",
    "NotFound",
    "PayloadTooLarge",
    "ProtocolError",
    "PythonExecutorClient",
    "PythonExecutorError",
    "RunOptions",
    "ServerBusy",
    "ServerError",
    "__version__",
    "detect_entrypoint",
]
