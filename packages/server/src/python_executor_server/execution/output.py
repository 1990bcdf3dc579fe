"""Output capture: a per-stream cap, and live fan-out to followers.

``OutputCapture`` is the ``OutputSink`` a backend writes into. It keeps at most
``cap`` bytes of each stream (the rest is counted and dropped, so a flood costs
the server no more than the cap) and hands every kept chunk, decoded, to the
followers subscribed at that moment.

Usage::

    capture = OutputCapture(cap=8 << 20)
    follower = capture.subscribe()       # asyncio.Queue of LogEvent, None at the end
    capture.write("stdout", b"hi\\n")
    capture.close()
"""

from __future__ import annotations

import asyncio
import codecs
from dataclasses import dataclass, field

STREAMS = ("stdout", "stderr")


@dataclass(frozen=True)
class LogEvent:
    stream: str  # "stdout" | "stderr"
    text: str


@dataclass
class _Stream:
    cap: int
    kept: bytearray = field(default_factory=bytearray)
    dropped: int = 0
    decoder: codecs.IncrementalDecoder = field(
        default_factory=lambda: codecs.getincrementaldecoder("utf-8")("replace")
    )

    def take(self, data: bytes) -> bytes:
        room = self.cap - len(self.kept)
        kept = data[: max(room, 0)]
        self.kept += kept
        self.dropped += len(data) - len(kept)
        return kept


class OutputCapture:
    def __init__(self, cap: int) -> None:
        self._streams = {name: _Stream(cap) for name in STREAMS}
        self._followers: list[asyncio.Queue[LogEvent | None]] = []
        self.closed = False

    def write(self, stream: str, data: bytes) -> None:
        state = self._streams[stream]
        kept = state.take(data)
        if kept:
            # Decoding every kept chunk keeps the decoder aligned for followers who join later.
            text = state.decoder.decode(kept)
            if text and self._followers:
                self._publish(LogEvent(stream, text))

    def _publish(self, event: LogEvent | None) -> None:
        for queue in self._followers:
            queue.put_nowait(event)

    def subscribe(self) -> asyncio.Queue[LogEvent | None]:
        """A queue that first replays what was kept so far, then gets new chunks."""
        queue: asyncio.Queue[LogEvent | None] = asyncio.Queue()
        for name in STREAMS:
            if self._streams[name].kept:
                queue.put_nowait(LogEvent(name, self.text(name)))
        if self.closed:
            queue.put_nowait(None)
        else:
            self._followers.append(queue)
        return queue

    def unsubscribe(self, queue: asyncio.Queue[LogEvent | None]) -> None:
        if queue in self._followers:
            self._followers.remove(queue)

    def close(self) -> None:
        self.closed = True
        for name, state in self._streams.items():
            tail = state.decoder.decode(b"", final=True)
            if tail:
                self._publish(LogEvent(name, tail))
        self._publish(None)
        self._followers.clear()

    def text(self, stream: str) -> str:
        return self._streams[stream].kept.decode("utf-8", "replace")

    def truncated(self, stream: str) -> bool:
        return self._streams[stream].dropped > 0
