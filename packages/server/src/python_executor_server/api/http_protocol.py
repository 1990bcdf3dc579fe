"""uvicorn's httptools protocol, with two changes for big request bodies and one
for small responses.

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

**A response in one write.** uvicorn writes a response's head when the app
starts it and its body when the app sends it: two ``send`` calls, so two TCP
segments (the socket has ``TCP_NODELAY``) and, for a client already waiting,
two wake-ups. The first write of a response is held until the next write (both
then go out in one) or the end of the loop pass, whichever comes first: a head
and body sent one after the other leave together; a head whose body is not
ready yet (a stream) leaves at the end of the pass, as good as at once. Writes
over ``HOLD_MAX`` bytes are not held.

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
HOLD_MAX = 64 * 1024  # bytes of a write that may be held back (module doc)


class HttpProtocol(HttpToolsProtocol):
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(_Connection(transport, self))  # type: ignore[arg-type]

    def data_received(self, data: bytes) -> None:
        size = getattr(self.transport, "max_size", None)
        if size is not None:
            wanted = BIG_READ if len(data) >= DEFAULT_READ else DEFAULT_READ
            if wanted != size:
                self.transport.max_size = wanted  # type: ignore[attr-defined]
        super().data_received(data)


_OWN = ("_transport", "_protocol", "_lingering", "_held")


class _Connection:
    """The connection's transport as uvicorn sees it: ``close`` lingers, and a response's
    first write waits for its next one (module doc)."""

    def __init__(self, transport: asyncio.Transport, protocol: HttpProtocol) -> None:
        self._transport = transport
        self._protocol = protocol
        self._lingering = False
        self._held: bytes | None = None

    def write(self, data: bytes) -> None:
        held = self._held
        if held is not None and len(data) <= HOLD_MAX:  # the next write: both in one
            self._held = None
            self._transport.write(held + data)
        elif held is not None or len(data) > HOLD_MAX or self._transport.is_closing():
            self._flush()  # (a big write is not copied to go with what is held)
            self._transport.write(data)
        else:
            self._held = bytes(data)
            asyncio.get_running_loop().call_soon(self._flush)

    def writelines(self, data: Any) -> None:
        self.write(b"".join(data))

    def _flush(self) -> None:
        held, self._held = self._held, None
        if held is not None:
            self._transport.write(held)

    def write_eof(self) -> None:
        self._flush()
        self._transport.write_eof()

    def get_write_buffer_size(self) -> int:
        return self._transport.get_write_buffer_size() + len(self._held or b"")

    def abort(self) -> None:
        self._held = None
        self._transport.abort()

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
        self._flush()  # (the response, before the end)
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
