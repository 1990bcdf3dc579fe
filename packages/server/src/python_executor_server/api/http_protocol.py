"""uvicorn's httptools protocol, with two changes for big request bodies.

**Reads of 1 MiB.** asyncio reads a socket 256 KiB at a time (``max_size`` of
its selector transport), and uvicorn's cost for each read (parsing, flow
control, one ASGI message, one multipart parser call) is the same whatever its
size: for a 1 GiB upload the event loop spent about 1.1 s of CPU on 4,096
reads. When a read fills the buffer (more is waiting), the next one may take
up to 1 MiB; once reads come back small again (requests, not bodies), it goes
back to asyncio's default, so small requests never pay for a 1 MiB buffer.

**A lingering close.** When the server closes a connection while the client
is still sending (a 413 for a body over the limit, any error answered before
the body was read), closing a socket with unread input makes the kernel send
a reset, and a reset can destroy the response before the client has read it:
the client sees "connection reset" instead of the 413. So, as Apache and nginx
do, the connection is shut down for writing after the response (the client
sees its end), and what still arrives is read and dropped until the client
closes its side, nothing came for ``LINGER_IDLE`` seconds, or ``LINGER_MAX``
seconds have passed; only then is the socket closed.

Transports without ``max_size`` or half-close (not asyncio's TCP selector
transports) are left as they are.

Usage::

    uvicorn.run(app, http=HttpProtocol)
"""

from __future__ import annotations

import asyncio
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

DEFAULT_READ = 256 * 1024  # asyncio's selector transport's max_size
BIG_READ = 1024 * 1024
LINGER_IDLE = 2.0  # seconds without input that end a lingering close
LINGER_MAX = 10.0  # seconds a lingering close lasts at most


class HttpProtocol(HttpToolsProtocol):
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(_LingeringClose(transport, self))  # type: ignore[arg-type]

    def data_received(self, data: bytes) -> None:
        size = getattr(self.transport, "max_size", None)
        if size is not None:
            wanted = BIG_READ if len(data) >= DEFAULT_READ else DEFAULT_READ
            if wanted != size:
                self.transport.max_size = wanted  # type: ignore[attr-defined]
        super().data_received(data)


_OWN = ("_transport", "_protocol", "_lingering")


class _LingeringClose:
    """The connection's transport as uvicorn sees it: ``close`` lingers (module doc)."""

    def __init__(self, transport: asyncio.Transport, protocol: HttpProtocol) -> None:
        self._transport = transport
        self._protocol = protocol
        self._lingering = False

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _OWN:
            object.__setattr__(self, name, value)
        else:  # max_size, above all
            setattr(self._transport, name, value)

    def is_closing(self) -> bool:
        return self._lingering or self._transport.is_closing()

    def close(self) -> None:
        transport = self._transport
        if self._lingering or transport.is_closing():
            return
        if not transport.can_write_eof():
            transport.close()
            return
        self._lingering = True
        try:
            transport.set_protocol(_Drain(transport))
            transport.write_eof()  # after what is buffered: the response, then the end
            transport.resume_reading()
        except OSError:  # the client is gone already (ENOTCONN): nothing to linger for
            transport.close()
        finally:
            self._protocol.connection_lost(None)  # uvicorn forgets the connection now


class _Drain(asyncio.Protocol):
    """Reads and drops the rest of a closed connection's input, then closes it."""

    def __init__(self, transport: asyncio.Transport) -> None:
        self._transport = transport
        loop = asyncio.get_running_loop()
        self._deadline = loop.time() + LINGER_MAX
        self._timer = loop.call_later(LINGER_IDLE, self._stop)

    def data_received(self, data: bytes) -> None:
        self._timer.cancel()
        loop = asyncio.get_running_loop()
        self._timer = loop.call_at(min(loop.time() + LINGER_IDLE, self._deadline), self._stop)

    def eof_received(self) -> bool:
        self._stop()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._timer.cancel()

    def _stop(self) -> None:
        self._timer.cancel()
        self._transport.close()
