"""The asynchronous client: the same methods as ``_client.py``, awaited."""

from __future__ import annotations

import functools
from collections.abc import AsyncGenerator, AsyncIterator, Iterator, Mapping
from contextlib import aclosing
from types import TracebackType
from typing import Any, Unpack, cast

import anyio
import httpx2
from httpx2 import ServerSentEvent

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

__all__ = ["AsyncPythonExecutorClient"]


class AsyncPythonExecutorClient:
    """Asynchronous client of a python-executor server (asyncio or trio).

    Usage::

        async with AsyncPythonExecutorClient("http://localhost:8080") as client:
            result = await client.execute_sync(files={"main.py": "print('hi')"})
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
        transport: httpx2.AsyncBaseTransport | None = None,
    ) -> None:
        self.base_url = _base.normalize_base_url(base_url)
        self.timeout = timeout
        self._http = httpx2.AsyncClient(
            base_url=self.base_url,
            timeout=timeout,
            headers={"User-Agent": f"python-executor-client/{__version__}", **(headers or {})},
            transport=transport,
        )

    async def __aenter__(self) -> AsyncPythonExecutorClient:
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def execute_sync(
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
        call = await _prepare(True, files, tar_data, metadata, options, upload_progress)
        return _base.decode(ExecutionResult, await self._send(call))

    async def execute_async(
        self,
        files: FilesInput | None = None,
        tar_data: TarInput | None = None,
        metadata: Metadata | None = None,
        *,
        upload_progress: _base.ProgressCallback | None = None,
        **options: Unpack[RunOptions],
    ) -> str:
        """Upload a project and start it; returns the execution id at once."""
        call = await _prepare(False, files, tar_data, metadata, options, upload_progress)
        return _base.decode(SubmitResponse, await self._send(call)).execution_id

    async def eval(
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
        return _base.decode(ExecutionResult, await self._send(_base.eval_call(request)))

    async def get_execution(self, execution_id: str) -> ExecutionResult:
        return _base.decode(ExecutionResult, await self._send(_base.execution_call(execution_id)))

    async def kill(self, execution_id: str) -> str:
        """Stop a pending or running execution; returns ``killed`` or the status it had."""
        return _base.decode(KillResponse, await self._send(_base.kill_call(execution_id))).status

    async def list_executions(
        self,
        status: ExecutionStatus | str | None = None,
        limit: int | None = None,
        cursor: str | None = None,
    ) -> ExecutionList:
        """Executions, newest first; pass ``next_cursor`` back as ``cursor`` for more."""
        call = _base.list_call(status, limit, cursor)
        return _base.decode(ExecutionList, await self._send(call))

    async def health(self) -> dict[str, Any]:
        """The server's ``/health`` answer (``status``, and backend, versions … where given)."""
        return _base.decode_json(await self._send(_base.health_call()))

    async def wait_for_completion(
        self, execution_id: str, poll_interval: float = 2.0, max_wait: float | None = None
    ) -> ExecutionResult:
        """Poll until the execution has finished; ``ExecutionTimeout`` after ``max_wait`` s."""
        started = anyio.current_time()
        while True:
            result = await self.get_execution(execution_id)
            if result.status.finished:
                return result
            if max_wait is not None and anyio.current_time() - started > max_wait:
                raise ExecutionTimeout(f"execution {execution_id} did not finish in {max_wait} s")
            await anyio.sleep(poll_interval)

    async def follow(
        self, execution_id: str, poll_interval: float = 1.0
    ) -> AsyncIterator[LogEvent]:
        """Output as it is produced, then one ``exit`` event carrying the final result.

        Uses the live-logs stream; polls when the server has none or it breaks off.
        """
        tracker = OutputTracker()
        while not tracker.finished:
            if tracker.live:
                async for event in self._stream_logs(execution_id, tracker):
                    yield event
            if tracker.poll_now and not tracker.finished:
                for event in tracker.on_result(await self.get_execution(execution_id)):
                    yield event
                if not tracker.finished:
                    await anyio.sleep(poll_interval)

    async def _stream_logs(
        self, execution_id: str, tracker: OutputTracker
    ) -> AsyncIterator[LogEvent]:
        call = _base.logs_call(execution_id)
        try:
            async with self._http.stream(
                call.method, call.path, headers=call.headers, timeout=self.timeout
            ) as response:
                if _base.logs_unsupported(response):
                    tracker.end_stream(supported=False)
                    return
                if response.status_code >= 400:
                    await response.aread()
                    raise _base.error_from(response)
                tracker.begin_stream()
                source = cast(
                    AsyncGenerator[ServerSentEvent], httpx2.EventSource(response).__aiter__()
                )
                async with aclosing(source):
                    async for sse in source:
                        for event in tracker.on_sse(sse.event, sse.data):
                            yield event
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

    async def _send(self, call: _base.Call) -> httpx2.Response:
        content = _aiter(call) if call.stream is not None else call.body
        try:
            return await self._http.request(
                call.method,
                call.path,
                params=call.params,
                headers=call.headers,
                content=content,
                timeout=_base.timeout_for(call, self.timeout),
            )
        except (httpx2.HTTPError, httpx2.InvalidURL) as exc:
            raise _base.transport_error(exc, self.base_url) from exc


async def _prepare(
    wait: bool,
    files: FilesInput | None,
    tar_data: TarInput | None,
    metadata: Metadata | None,
    options: Mapping[str, Any],
    progress: _base.ProgressCallback | None,
) -> _base.Call:
    """Packing walks directories: off the event loop."""
    prepare = functools.partial(
        _base.prepare_submit, wait, files, tar_data, metadata, options, progress
    )
    return await anyio.to_thread.run_sync(prepare)


async def _aiter(call: _base.Call) -> AsyncIterator[bytes]:
    """The upload body; chunks that are read from disk are read in a worker thread."""
    assert call.stream is not None
    chunks = call.stream()
    if not call.blocking:
        for chunk in chunks:
            yield chunk
        return
    while (read := await anyio.to_thread.run_sync(_next_chunk, chunks)) is not None:
        yield read


def _next_chunk(chunks: Iterator[bytes]) -> bytes | None:
    return next(chunks, None)
