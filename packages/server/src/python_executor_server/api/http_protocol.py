"""uvicorn's httptools protocol, reading a big request body in 1 MiB pieces.

asyncio reads a socket 256 KiB at a time (``max_size`` of its selector
transport), and uvicorn's cost for each read (parsing, flow control, one ASGI
message, one multipart parser call) is the same whatever its size: for a
1 GiB upload the event loop spent about 1.1 s of CPU on 4,096 reads. When a
read fills the buffer (more is waiting), this protocol lets the next read take
up to 1 MiB; once reads come back small again (requests, not bodies), it goes
back to asyncio's default, so small requests never pay for a 1 MiB buffer.
Transports without ``max_size`` (not asyncio's selector transports) are left
as they are.

Usage::

    uvicorn.run(app, http=HttpProtocol)
"""

from __future__ import annotations

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

DEFAULT_READ = 256 * 1024  # asyncio's selector transport's max_size
BIG_READ = 1024 * 1024


class HttpProtocol(HttpToolsProtocol):
    def data_received(self, data: bytes) -> None:
        size = getattr(self.transport, "max_size", None)
        if size is not None:
            wanted = BIG_READ if len(data) >= DEFAULT_READ else DEFAULT_READ
            if wanted != size:
                self.transport.max_size = wanted  # type: ignore[attr-defined]
        super().data_received(data)
