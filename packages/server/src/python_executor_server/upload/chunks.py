"""A byte stream that arrives in chunks, with the file interface tarfile reads through.

``ChunkReader(next_chunk)`` pulls chunks from ``next_chunk()`` (``None`` or empty at
the end) only when they are needed. tarfile reads its headers with ``read``,
``tell`` and small ``seek``s (back within the last few blocks, forward over a
member's padding); a member's data is handed on without a copy by ``copy_to``.
At most the unread rest of one chunk and a few KiB behind the read position
are kept, whatever the stream's length.

Usage::

    reader = ChunkReader(lambda: f.read(1 << 20))
    archive = tarfile.open(fileobj=reader, mode="r:")
    reader.copy_to(fd, member.size)  # the member's data, from the socket to a file
"""

from __future__ import annotations

import os
from collections.abc import Callable

Chunk = bytes | bytearray
LOOKBEHIND = 4096  # how far back a seek may go from the read position


class ChunkReader:
    def __init__(self, next_chunk: Callable[[], Chunk | None]) -> None:
        self._next = next_chunk
        self._buf = bytearray()  # the stream's bytes from offset self._start on
        self._start = 0
        self._pos = 0
        self._ended = False

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        if whence == os.SEEK_CUR:
            offset += self._pos
        elif whence != os.SEEK_SET:
            raise OSError("a chunk stream cannot seek from its end")
        if offset < self._start:
            raise OSError(f"cannot seek back to {offset}: only from {self._start} on is kept")
        self._pos = offset
        self._fill(offset)  # what is skipped over is not kept
        return self._pos

    def peek(self, size: int) -> bytes:
        """Up to ``size`` bytes from the read position, which stays where it is."""
        self._fill(self._pos + size)
        at = self._pos - self._start
        return bytes(self._buf[at : at + size])

    def read(self, size: int = -1) -> bytes:
        if size < 0:
            raise OSError("a chunk stream is read in pieces of a given size")
        data = self.peek(size)
        self._pos += len(data)
        self._trim()
        return data

    def copy_to(self, fd: int, size: int) -> int:
        """Write the next ``size`` bytes to ``fd``; fewer only when the stream ends first."""
        done = self._write_buffered(fd, size)
        while done < size and (chunk := self._pull()) is not None:
            take = min(len(chunk), size - done)
            with memoryview(chunk) as view:
                _write_all(fd, view[:take])
                done += take
                self._pos += take
                self._buf, self._start = bytearray(view[take:]), self._pos
        return done

    def _write_buffered(self, fd: int, size: int) -> int:
        at = self._pos - self._start
        take = max(0, min(len(self._buf) - at, size))
        if take:
            with memoryview(self._buf) as view:
                _write_all(fd, view[at : at + take])
            self._pos += take
            self._trim()
        return take

    def _fill(self, end: int) -> None:
        while self._start + len(self._buf) < end and (chunk := self._pull()) is not None:
            self._buf += chunk
            self._trim()

    def _trim(self) -> None:
        """Drop what lies more than LOOKBEHIND before the read position."""
        drop = min(self._pos - LOOKBEHIND - self._start, len(self._buf))
        if drop >= LOOKBEHIND:  # in steps, not per read: del from the front is cheap, not free
            del self._buf[:drop]
            self._start += drop

    def _pull(self) -> Chunk | None:
        if self._ended:
            return None
        chunk = self._next()
        if not chunk:
            self._ended = True
            return None
        return chunk


def _write_all(fd: int, data: memoryview) -> None:
    while data:
        data = data[os.write(fd, data) :]
