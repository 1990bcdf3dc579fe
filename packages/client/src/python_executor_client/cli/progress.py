"""An upload progress bar on stderr, only for big uploads to a terminal.

Usage::

    with UploadProgress.for_stderr() as progress:
        client.execute_sync(files=path, upload_progress=progress)
"""

from __future__ import annotations

import sys
from types import TracebackType

from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

__all__ = ["THRESHOLD_BYTES", "UploadProgress"]

THRESHOLD_BYTES = 4 * 1024 * 1024


class UploadProgress:
    """A ``(sent, total)`` callback; shows a bar once the total is over the threshold."""

    def __init__(self, enabled: bool, threshold: int = THRESHOLD_BYTES) -> None:
        self._enabled = enabled
        self._threshold = threshold
        self._progress: Progress | None = None
        self._task: TaskID | None = None

    @classmethod
    def for_stderr(cls, quiet: bool = False) -> UploadProgress:
        return cls(enabled=not quiet and sys.stderr.isatty())

    def __enter__(self) -> UploadProgress:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def __call__(self, sent: int, total: int) -> None:
        if not self._enabled or total < self._threshold:
            return
        if self._progress is None:
            self._start(total)
        assert self._progress is not None and self._task is not None
        self._progress.update(self._task, completed=sent)
        if sent >= total:
            self.close()  # the bar is done before the program's output appears

    def _start(self, total: int) -> None:
        self._progress = Progress(
            TextColumn("uploading"),
            BarColumn(),
            DownloadColumn(),
            TransferSpeedColumn(),
            TimeRemainingColumn(),
            console=Console(stderr=True),
            transient=True,
        )
        self._task = self._progress.add_task("upload", total=total)
        self._progress.start()

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()
        self._enabled = False
        self._progress = None
