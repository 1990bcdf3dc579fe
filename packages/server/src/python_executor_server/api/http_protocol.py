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

**An eval answered before uvicorn's request cycle.** ``POST /api/v1/eval`` is the
hot path: for each request uvicorn makes a request cycle (an ``asyncio.Event``, a
task, the ASGI scope) and passes it through the app's middleware to ``EvalRoute``,
and the answer back through two ASGI sends; 0.1-0.2 ms of a run's ~1 ms of server
time, measured (docs/benchmarks.md). When the request can be nothing else but an
eval (POST to the exact path, HTTP/1.1, JSON with a declared length under the cap
and under uvicorn's read-pause mark, no ``Expect``, no upgrade, nothing pipelined
before it) the protocol reads the body, validates it and runs the eval itself, and
writes the answer in one write with uvicorn's default headers. A body pydantic
rejects is handed to the app as if it had come the usual way (errors keep one
source: the FastAPI route); keep-alive, pipelining behind it, graceful shutdown and
the access log work as for any request. Only the app ``create_app`` made, as it made
it, is answered this way (``app.state.eval_shortcut``): once a middleware has been
added to it (``app.add_middleware``), or when uvicorn runs another app (one that wraps
or mounts it), every eval goes through the app, so that no middleware is passed by.

Transports without ``max_size`` or half-close (not asyncio's TCP selector
transports) are left as they are.

Usage::

    uvicorn.run(app, http=HttpProtocol)
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from python_executor_client.models import EvalRequest
from uvicorn.protocols.http.flow_control import HIGH_WATER_LIMIT
from uvicorn.protocols.http.httptools_impl import (
    STATUS_LINE,
    HttpToolsProtocol,
    RequestResponseCycle,
)
from uvicorn.protocols.utils import get_client_addr

from .deps import Services
from .errors import internal_error_response
from .eval_route import EvalShortcut, answer, is_json, parsed
from .timing import BEGAN

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

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self.scope[BEGAN] = time.perf_counter()  # type: ignore[literal-required]

    # --- an eval answered here (module doc) ----------------------------------------
    def on_headers_complete(self) -> None:
        services = self._eval_services()
        if services is None:
            super().on_headers_complete()
            return
        began = self.scope[BEGAN]  # type: ignore[literal-required]
        keep_alive = self.parser.should_keep_alive()
        self.cycle = _EvalCycle(services, self.url.decode("ascii"), began, keep_alive)  # type: ignore[assignment]
        if self.access_log:
            self.cycle.client = get_client_addr(self.scope)  # type: ignore[attr-defined]

    def _eval_services(self) -> Services | None:
        """The app's services, when this request is an eval this protocol answers."""
        app = self.config.app
        state = getattr(app, "state", None)
        shortcut: EvalShortcut | None = getattr(state, "eval_shortcut", None)
        if (
            shortcut is None
            or self.url != shortcut.path
            or len(getattr(app, "user_middleware", ())) != shortcut.middleware
        ):
            return None
        parser = self.parser
        if (
            parser.get_method() != b"POST"
            or parser.get_http_version() != "1.1"
            or parser.should_upgrade()
            or self.expect_100_continue
            or self.limit_concurrency is not None
            or self.pipeline
            or not (self.cycle is None or self.cycle.response_complete)
        ):
            return None
        length = content_type = None
        for name, value in self.headers:
            if name == b"content-length":
                length = value
            elif name == b"content-type":
                content_type = value
            elif name == b"transfer-encoding":
                return None
        if length is None or not length.isdigit() or content_type is None:
            return None
        if int(length) > min(shortcut.max_bytes, HIGH_WATER_LIMIT) or not is_json(content_type):
            return None
        return getattr(state, "services", None)  # None until the app has started

    def on_message_complete(self) -> None:
        cycle = self.cycle
        if not isinstance(cycle, _EvalCycle) or cycle.response_complete:
            super().on_message_complete()
            return
        cycle.more_body = False
        request = parsed(bytes(cycle.body))
        if request is None:
            self._to_app(cycle)
            return
        task = self.loop.create_task(self._answer_eval(cycle, request))
        task.add_done_callback(self.tasks.discard)
        self.tasks.add(task)

    def _to_app(self, cycle: _EvalCycle) -> None:
        """The request to the app, the usual way, its body already read."""
        scope = self.scope
        scope["method"], scope["path"] = "POST", self.url.decode("ascii")
        scope["raw_path"], scope["query_string"] = self.url, b""
        app_cycle = RequestResponseCycle(
            scope=self.scope,
            transport=self.transport,
            flow=self.flow,
            logger=self.logger,
            access_logger=self.access_logger,
            access_log=self.access_log,
            default_headers=self.server_state.default_headers,
            message_event=asyncio.Event(),
            expect_100_continue=False,
            keep_alive=cycle.keep_alive,
            on_response=self.on_response_complete,
        )
        app_cycle.body, app_cycle.more_body = cycle.body, False
        app_cycle.message_event.set()
        self.cycle = app_cycle
        self._start_asgi_task(app_cycle, self.app)

    async def _answer_eval(self, cycle: _EvalCycle, request: EvalRequest) -> None:
        # (self.scope and self.url may be those of a request pipelined behind it by now)
        try:
            status, body, extra = await answer(cycle.services, request, cycle.began)
        except Exception as exc:  # as the app's catch-all answers it
            response = internal_error_response(exc, cycle.path)
            status, body, extra = response.status_code, bytes(response.body), []
        if cycle.disconnected or self.transport.is_closing():
            return  # (the run is over and stored all the same)
        head = [STATUS_LINE[status]]
        for name, value in (*self.server_state.default_headers, *_JSON, *extra):
            head += [name, b": ", value, b"\r\n"]
        head += [b"content-length: ", str(len(body)).encode(), b"\r\n"]
        if not cycle.keep_alive:  # the client asked, or the server is shutting down
            head.append(b"connection: close\r\n")
        head += [b"\r\n", body]
        cycle.response_complete = True
        self.transport.write_now(b"".join(head))  # type: ignore[attr-defined]
        if self.access_log:
            self.access_logger.info('%s - "POST %s HTTP/1.1" %d', cycle.client, cycle.path, status)
        if not cycle.keep_alive:
            self.transport.close()
        self.on_response_complete()


_JSON = ((b"content-type", b"application/json"),)


class _NoEvent:
    """An eval cycle's ``message_event``: nothing waits for its body (uvicorn sets it)."""

    def set(self) -> None:
        pass


class _EvalCycle:
    """The part of uvicorn's ``RequestResponseCycle`` that the protocol's callbacks use
    (``on_body``, ``connection_lost``, ``shutdown``), for an eval answered here."""

    def __init__(self, services: Services, path: str, began: float, keep_alive: bool) -> None:
        self.services = services
        self.path = path
        self.began = began
        self.keep_alive = keep_alive
        self.body = bytearray()
        self.more_body = True
        self.response_complete = False
        self.disconnected = False
        self.message_event = _NoEvent()
        self.client = ""


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

    def write_now(self, data: bytes) -> None:
        """A whole response: written at once, after anything held."""
        self._flush()
        self._transport.write(data)

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
