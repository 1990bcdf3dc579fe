"""Following an execution, sans I/O: SSE events or successive polls → ``LogEvent`` items.

The tracker counts what it has already handed out per stream, so output is never
repeated when it reconnects (the server replays a run's output from its start to
each new follower) or switches to polling. The shells run this loop::

    while not tracker.finished:
        if tracker.live:        read the live stream: begin_stream(), on_sse()…, end_stream()
        if tracker.poll_now:    on_result(GET /executions/{id}), then sleep
"""

from __future__ import annotations

from dataclasses import dataclass

from pydantic import ValidationError

from .errors import ProtocolError
from .models import ExecutionResult, LogChunk, LogEventType

__all__ = ["LogEvent", "OutputTracker"]


@dataclass(frozen=True)
class LogEvent:
    """One item of ``follow()``: output of a stream, or the final ``exit`` with the result.

    Usage::

        for event in client.follow(execution_id):
            if event.type is LogEventType.EXIT:
                print(event.result.exit_code)
            else:
                print(event.text, end="")
    """

    type: LogEventType
    text: str = ""
    result: ExecutionResult | None = None


class OutputTracker:
    def __init__(self) -> None:
        self._sent = {LogEventType.STDOUT: 0, LogEventType.STDERR: 0}
        self._skip = dict(self._sent)
        self.result: ExecutionResult | None = None
        self.live = True  # the server has a live stream worth (re)connecting to
        self.poll_now = False
        self.stream_ended = False

    @property
    def finished(self) -> bool:
        return self.result is not None

    def begin_stream(self) -> None:
        """A new connection: its replay of what was already shown is skipped."""
        self._skip = dict(self._sent)
        self.stream_ended = False

    def end_stream(self, *, supported: bool = True, timed_out: bool = False) -> None:
        """The stream is over; a silent one (timed out) is simply reopened."""
        self.live = supported
        self.poll_now = not timed_out

    def on_sse(self, event: str, data: str) -> list[LogEvent]:
        """One Server-Sent Event; unknown event names are ignored."""
        if event in (LogEventType.STDOUT.value, LogEventType.STDERR.value):
            kind = LogEventType(event)
            text = self._skipped(kind, _chunk_text(data))
            return [self._output(kind, text)] if text else []
        if event != LogEventType.EXIT.value:
            return []
        self.stream_ended = True
        try:
            result = ExecutionResult.model_validate_json(data)
        except ValidationError:
            return []  # the caller polls for the final result
        return self.on_result(result)

    def on_result(self, result: ExecutionResult) -> list[LogEvent]:
        """A snapshot from polling (or the ``exit`` event): what is new, then the end."""
        streams = ((LogEventType.STDOUT, result.stdout), (LogEventType.STDERR, result.stderr))
        events = [
            self._output(kind, text[self._sent[kind] :])
            for kind, text in streams
            if len(text) > self._sent[kind]
        ]
        if result.status.finished:
            self.result = result
            events.append(LogEvent(LogEventType.EXIT, result=result))
        return events

    def _skipped(self, kind: LogEventType, text: str) -> str:
        skip = min(self._skip[kind], len(text))
        self._skip[kind] -= skip
        return text[skip:]

    def _output(self, kind: LogEventType, text: str) -> LogEvent:
        self._sent[kind] += len(text)
        return LogEvent(kind, text)


def _chunk_text(data: str) -> str:
    try:
        return LogChunk.model_validate_json(data).data
    except ValidationError:
        raise ProtocolError(f"unexpected live-log event data: {data[:80]!r}") from None
