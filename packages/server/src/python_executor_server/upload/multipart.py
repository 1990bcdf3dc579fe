"""Streaming reader of the ``tar`` + ``metadata`` multipart body of ``/exec`` requests.

The body goes from the socket through python-multipart's streaming parser:
the ``tar`` part is checked and extracted as it arrives (``extract_chunks`` in
a worker thread, fed 2 MiB batches, at most ~8 MiB in memory, so that
receiving and extracting overlap, and the data is written once, straight to
its file), the ``metadata`` part is kept in memory up to a small cap, and
nothing else is buffered. Never ``UploadFile`` / ``request.form()``.

Usage::

    upload = await receive_exec_upload(request, workdir, max_bytes=..., max_entries=100_000)
    metadata = Metadata.model_validate_json(upload.metadata)
    upload.project.root, upload.project.files  # workdir / "project"

``dest_dir`` is created when missing. On any error everything this call wrote
is removed before the error is raised (the caller still owns ``dest_dir``).

An error raised while the client is still sending (413 above all) should be
answered with ``Connection: close``: uvicorn then stops reading, where it would
otherwise read and discard the rest of the body, however long, to keep the
connection alive.
"""

from __future__ import annotations

import contextlib
import functools
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import anyio
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream
from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.datastructures import Headers
from starlette.requests import ClientDisconnect, Request

from python_executor_server import errors
from python_executor_server.upload.tarsafe import ExtractedProject, extract_chunks

if TYPE_CHECKING:
    from python_multipart.multipart import MultipartCallbacks

PROJECT_DIRNAME = "project"
_FLUSH_BYTES = 2 << 20  # one thread hop per 2 MiB extracted, not per socket read
_QUEUED_BATCHES = 3  # so at most ~8 MiB received but not yet extracted
_TAR, _METADATA = "tar", "metadata"


@dataclass(frozen=True)
class ExecUpload:
    project: ExtractedProject  # the `tar` part, checked and extracted into dest_dir/project
    metadata: bytes  # the `metadata` part (JSON text, not parsed here)


async def receive_exec_upload(
    request: Request,
    dest_dir: Path,
    *,
    max_bytes: int,
    max_entries: int,
    max_metadata_bytes: int = 1 << 20,
) -> ExecUpload:
    """Stream the request's multipart body: ``tar`` extracted into ``dest_dir/project``.

    Raises PayloadTooLarge once the body passes ``max_bytes``, UnsupportedArchive
    for a compressed ``tar`` part, UnsafeArchive / BadRequest for an archive
    ``extract_chunks`` refuses, BadRequest for anything else wrong with the body.
    """
    _check_declared_length(request.headers, max_bytes)
    parser, parts = _make_parser(request.headers, max_metadata_bytes)
    extractor = _Extractor(dest_dir, max_entries)
    try:
        await _receive(request, parser, parts, extractor, max_bytes)
    except BaseException:
        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(extractor.discard)
        raise
    assert extractor.project is not None
    return ExecUpload(project=extractor.project, metadata=bytes(parts.metadata))


def _check_declared_length(headers: Headers, max_bytes: int) -> None:
    declared = headers.get("content-length", "")
    if declared.isdigit() and int(declared) > max_bytes:
        raise _too_large(max_bytes)


def _too_large(max_bytes: int) -> errors.PayloadTooLarge:
    return errors.PayloadTooLarge(
        f"the request body is larger than the maximum of {max_bytes} bytes"
    )


def _make_parser(headers: Headers, max_metadata_bytes: int) -> tuple[MultipartParser, _Parts]:
    content_type, params = parse_options_header(headers.get("content-type"))
    boundary = params.get(b"boundary")
    if content_type != b"multipart/form-data" or not boundary:
        raise errors.BadRequest("the request body must be multipart/form-data with a boundary")
    parts = _Parts(max_metadata_bytes)
    try:
        return MultipartParser(boundary, parts.callbacks()), parts
    except FormParserError as exc:
        raise errors.BadRequest(f"the multipart body is malformed: {exc}") from exc


async def _receive(
    request: Request, parser: MultipartParser, parts: _Parts, extractor: _Extractor, max_bytes: int
) -> None:
    """Receiving and extracting overlap: the pump queues batches, the extractor takes them."""
    send, batches = anyio.create_memory_object_stream[bytearray](_QUEUED_BATCHES)
    try:
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(extractor.run, batches)
            async with send:  # closed, the extractor sees the archive's end
                await _pump(request, parser, parts, send, max_bytes)
    except BaseExceptionGroup as group:
        raise _reason(group, extractor.error) from None
    finally:
        batches.close()


def _reason(
    group: BaseExceptionGroup[BaseException], extractor_error: BaseException | None
) -> BaseException:
    """The body's own error first: the extractor then only saw the archive cut short."""
    body_errors = [exc for exc in group.exceptions if exc is not extractor_error]
    return (body_errors or list(group.exceptions))[0]


async def _pump(
    request: Request,
    parser: MultipartParser,
    parts: _Parts,
    send: MemoryObjectSendStream[bytearray],
    max_bytes: int,
) -> None:
    received = 0
    try:
        async for chunk in request.stream():
            received += len(chunk)
            if received > max_bytes:
                raise _too_large(max_bytes)
            _feed(parser, chunk)
            pending = len(parts.tar_pending)
            if pending >= _FLUSH_BYTES or (parts.tar_ended and pending):
                await send.send(parts.take_tar())
    except ClientDisconnect as exc:
        raise errors.BadRequest("the client disconnected before the body was complete") from exc
    parts.check_complete()


def _feed(parser: MultipartParser, chunk: bytes) -> None:
    try:
        parser.write(chunk)
    except FormParserError as exc:  # MultipartParseError and friends
        raise errors.BadRequest(f"the multipart body is malformed: {exc}") from exc


@dataclass
class _Parts:
    """Parser callbacks. They only route bytes to buffers: the pump does the I/O."""

    max_metadata_bytes: int
    tar_pending: bytearray = field(default_factory=bytearray)  # not yet queued for writing
    tar_ended: bool = False
    metadata: bytearray = field(default_factory=bytearray)
    finished: bool = False
    _seen: set[str] = field(default_factory=set)
    _current: str | None = None
    _header: bytearray = field(default_factory=bytearray)
    _value: bytearray = field(default_factory=bytearray)
    _disposition: bytes = b""

    def callbacks(self) -> MultipartCallbacks:
        return {
            "on_part_begin": self._on_part_begin,
            "on_header_field": lambda data, start, end: self._header.extend(data[start:end]),
            "on_header_value": lambda data, start, end: self._value.extend(data[start:end]),
            "on_header_end": self._on_header_end,
            "on_headers_finished": self._on_headers_finished,
            "on_part_data": self._on_part_data,
            "on_part_end": self._on_part_end,
            "on_end": self._on_end,
        }

    def check_complete(self) -> None:
        if not self.finished:
            raise errors.BadRequest("the multipart body ended before its closing boundary")
        for name in (_TAR, _METADATA):
            if name not in self._seen:
                raise errors.BadRequest(f"the multipart body has no `{name}` part")

    def take_tar(self) -> bytearray:
        taken, self.tar_pending = self.tar_pending, bytearray()
        return taken

    def _on_part_begin(self) -> None:
        self._current, self._disposition = None, b""

    def _on_header_end(self) -> None:
        if self._header.strip().lower() == b"content-disposition":
            self._disposition = bytes(self._value)
        self._header.clear()
        self._value.clear()

    def _on_headers_finished(self) -> None:
        name = parse_options_header(self._disposition)[1].get(b"name", b"").decode("latin-1")
        if name not in (_TAR, _METADATA):
            return  # an unknown part: its bytes are dropped
        if name in self._seen:
            raise errors.BadRequest(f"the multipart body has more than one `{name}` part")
        self._seen.add(name)
        self._current = name

    def _on_part_data(self, data: bytes, start: int, end: int) -> None:
        if self._current == _TAR:
            self.tar_pending += memoryview(data)[start:end]
        elif self._current == _METADATA:
            self.metadata += memoryview(data)[start:end]
            if len(self.metadata) > self.max_metadata_bytes:
                raise errors.BadRequest(
                    f"the `metadata` part is larger than {self.max_metadata_bytes} bytes"
                )

    def _on_part_end(self) -> None:
        if self._current == _TAR:
            self.tar_ended = True
        self._current = None

    def _on_end(self) -> None:
        self.finished = True


class _Extractor:
    """``extract_chunks`` in a worker thread, on the batches of the `tar` part as they come."""

    def __init__(self, dest_dir: Path, max_entries: int) -> None:
        self.dest_dir = dest_dir
        self.max_entries = max_entries
        self.project: ExtractedProject | None = None
        self.error: BaseException | None = None
        self._made_dir = False

    async def run(self, batches: MemoryObjectReceiveStream[bytearray]) -> None:
        try:
            self.project = await anyio.to_thread.run_sync(self._extract, batches)
        except BaseException as exc:
            self.error = exc
            raise

    def _extract(self, batches: MemoryObjectReceiveStream[bytearray]) -> ExtractedProject:
        with _storing():
            self._made_dir = not self.dest_dir.is_dir()
            self.dest_dir.mkdir(parents=True, exist_ok=True)
        return extract_chunks(
            functools.partial(_next_batch, batches),
            self.dest_dir / PROJECT_DIRNAME,
            max_entries=self.max_entries,
        )

    def discard(self) -> None:
        # best effort: never hide the error that got us here behind a cleanup one
        shutil.rmtree(self.dest_dir / PROJECT_DIRNAME, ignore_errors=True)
        if self._made_dir:
            with contextlib.suppress(OSError):
                self.dest_dir.rmdir()


def _next_batch(batches: MemoryObjectReceiveStream[bytearray]) -> bytearray | None:
    """The next batch of the `tar` part (from the worker thread); None at its end."""
    try:
        return anyio.from_thread.run(batches.receive)
    except anyio.EndOfStream:
        return None


@contextlib.contextmanager
def _storing() -> Iterator[None]:
    try:
        yield
    except OSError as exc:  # disk full, quota, permissions: ours, not the client's
        raise errors.ExecutorError(f"the upload could not be stored: {exc}") from exc
