"""The synchronous client: a thin httpx2 shell around ``_base``."""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping
from types import TracebackType
from typing import Any, Unpack

import httpx2

from . import _base
from ._follow import LogEvent, OutputTracker
from ._options import EvalFiles, EvalOptions, RunOptions, build_eval
from ._packing import FilesInput, TarInput
from ._version import __version__
from .errors import ExecutionTimeout
from .models import (
    ExecutionList,
    ExecutionResult,
    ExecutionStatus,
    KillResponse,
    Metadata,
    SubmitResponse,
)

__all__ = ["PythonExecutorClient"]


class PythonExecutorClient:
    """Client of a python-executor server (drop-in for the original's client).

    Usage::

        with PythonExecutorClient("http://localhost:8080") as client:
            result = client.execute_sync(files={"main.py": "print('hi')"}, timeout_seconds=10)
            print(result.stdout, result.exit_code)

    ``timeout`` is the HTTP timeout in seconds; a synchronous run waits at least its
    own ``timeout_seconds`` plus a margin.
    """

    def __init__(
        self,
        base_url: str = _base.DEFAULT_SERVER,
        timeout: float = 300,
        *,
        headers: Mapping[str, str] | None = None,
        transport: httpx2.BaseTransport | None = None,
    ) -> None:
        self.base_url = _base.normalize_base_url(base_url)
        self.timeout = timeout
        self._http = httpx2.Client(
            base_url=self.base_url,
            timeout=timeout,
            headers={"User-Agent": f"python-executor-client/{__version__}", **(headers or {})},
            transport=transport,
        )

    def __enter__(self) -> PythonExecutorClient:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def execute_sync(
        self,
        files: FilesInput | None = None,
        tar_data: TarInput | None = None,
        metadata: Metadata | None = None,
        *,
        upload_progress: _base.ProgressCallback | None = None,
        **options: Unpack[RunOptions],
    ) -> ExecutionResult:
        """Upload a project, run it and wait for the result.

        ``files``: a dict name → content, or a path to a file or directory;
        ``tar_data``: an uncompressed tar (bytes or a path). ``options`` are the
        Metadata and config fields (``entrypoint``, ``timeout_seconds`` …).
        """
        call = _base.prepare_submit(True, files, tar_data, metadata, options, upload_progress)
        return _base.decode(ExecutionResult, self._send(call))

    def execute_async(
        self,
        files: FilesInput | None = None,
        tar_data: TarInput | None = None,
        metadata: Metadata | None = None,
        *,
        upload_progress: _base.ProgressCallback | None = None,
        **options: Unpack[RunOptions],
    ) -> str:
        """Upload a project and start it; returns the execution id at once."""
        call = _base.prepare_submit(False, files, tar_data, metadata, options, upload_progress)
        return _base.decode(SubmitResponse, self._send(call)).execution_id

    def eval(
        self,
        code: str | None = None,
        *,
        files: EvalFiles | None = None,
        entrypoint: str | None = None,
        stdin: str | None = None,
        python_version: str | None = None,
        timeout_seconds: int | None = None,
        eval_last_expr: bool = True,
        **options: Unpack[EvalOptions],
    ) -> ExecutionResult:
        """Run code sent as JSON; ``result`` holds ``repr()`` of the last expression.

        Usage: ``client.eval("x = 5\\nx * 2").result == "10"``
        """
        fields: dict[str, Any] = {
            "entrypoint": entrypoint,
            "stdin": stdin,
            "python_version": python_version,
            "timeout_seconds": timeout_seconds,
            **options,
        }
        request = build_eval(code, files, eval_last_expr, fields)
        return _base.decode(ExecutionResult, self._send(_base.eval_call(request)))

    def get_execution(self, execution_id: str) -> ExecutionResult:
        return _base.decode(ExecutionResult, self._send(_base.execution_call(execution_id)))

    def kill(self, execution_id: str) -> str:
        """Stop a pending or running execution; returns ``killed`` or the status it had."""
        return _base.decode(KillResponse, self._send(_base.kill_call(execution_id))).status

    def list_executions(
        self,
        status: ExecutionStatus | str | None = None,
        limit: int | None = None,
        cursor: str | None = None,
    ) -> ExecutionList:
        """Executions, newest first; pass ``next_cursor`` back as ``cursor`` for more."""
        call = _base.list_call(status, limit, cursor)
        return _base.decode(ExecutionList, self._send(call))

    def health(self) -> dict[str, Any]:
        """The server's ``/health`` answer (``status``, and backend, versions … where given)."""
        return _base.decode_json(self._send(_base.health_call()))

    def wait_for_completion(
        self, execution_id: str, poll_interval: float = 2.0, max_wait: float | None = None
    ) -> ExecutionResult:
        """Poll until the execution has finished; ``ExecutionTimeout`` after ``max_wait`` s."""
        started = time.monotonic()
        while True:
            result = self.get_execution(execution_id)
            if result.status.finished:
                return result
            if max_wait is not None and time.monotonic() - started > max_wait:
                raise ExecutionTimeout(f"execution {execution_id} did not finish in {max_wait} s")
            time.sleep(poll_interval)

    def follow(self, execution_id: str, poll_interval: float = 1.0) -> Iterator[LogEvent]:
        """Output as it is produced, then one ``exit`` event carrying the final result.

        Uses the live-logs stream; polls when the server has none or it breaks off.
        """
        tracker = OutputTracker()
        while not tracker.finished:
            if tracker.live:
                yield from self._stream_logs(execution_id, tracker)
            if tracker.poll_now and not tracker.finished:
                yield from tracker.on_result(self.get_execution(execution_id))
                if not tracker.finished:
                    time.sleep(poll_interval)

    def _stream_logs(self, execution_id: str, tracker: OutputTracker) -> Iterator[LogEvent]:
        call = _base.logs_call(execution_id)
        try:
            with self._http.stream(
                call.method, call.path, headers=call.headers, timeout=self.timeout
            ) as response:
                if _base.logs_unsupported(response):
                    tracker.end_stream(supported=False)
                    return
                if response.status_code >= 400:
                    response.read()
                    raise _base.error_from(response)
                tracker.begin_stream()
                for event in httpx2.EventSource(response):
                    yield from tracker.on_sse(event.event, event.data)
                    if tracker.stream_ended:
                        break
        except httpx2.ConnectError as exc:
            raise _base.transport_error(exc, self.base_url) from exc
        except httpx2.ReadTimeout:
            tracker.end_stream(timed_out=True)  # a silent program: reconnect
            return
        except httpx2.TransportError:
            pass  # the stream broke off: poll once, then reconnect
        tracker.end_stream()

    def _send(self, call: _base.Call) -> httpx2.Response:
        content = call.stream() if call.stream is not None else call.body
        try:
            return self._http.request(
                call.method,
                call.path,
                params=call.params,
                headers=call.headers,
                content=content,
                timeout=_base.timeout_for(call, self.timeout),
            )
        except (httpx2.HTTPError, httpx2.InvalidURL) as exc:
            raise _base.transport_error(exc, self.base_url) from exc
