"""One exception tree for the whole server; ``app.py`` maps it to HTTP in one place.

::

    ExecutorError                      500  (anything unexpected of ours)
    ├── BadRequest                     400  invalid metadata, limits, entrypoint, version ...
    │   ├── UnsupportedArchive         400  gzip/zip/... instead of an uncompressed tar
    │   ├── UnsafeArchive              400  an entry that leaves the root, a link, a device ...
    │   └── InvalidRequirement         400  an option line, URL or path in requirements
    ├── NotFound                       404  unknown execution id
    ├── PayloadTooLarge                413  body or code over the configured maximum
    ├── QueueFull                      503  + Retry-After
    ├── InvalidTransition              409  a lifecycle step that is not allowed (a bug if seen)
    ├── SandboxError                   500  the sandbox could not be set up
    └── InstallError                   (never HTTP: ends a run as ``failed``)

Handlers never build HTTP errors themselves: they raise one of these.
"""

from __future__ import annotations


class ExecutorError(Exception):
    status_code = 500

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class BadRequest(ExecutorError):
    status_code = 400


class UnsupportedArchive(BadRequest):
    pass


class UnsafeArchive(BadRequest):
    def __init__(self, entry: str, reason: str) -> None:
        super().__init__(f"archive entry {entry!r} rejected: {reason}")
        self.entry = entry


class InvalidRequirement(BadRequest):
    def __init__(self, line: str, reason: str) -> None:
        super().__init__(f"requirement {line!r} rejected: {reason}")
        self.line = line


class NotFound(ExecutorError):
    status_code = 404


class PayloadTooLarge(ExecutorError):
    status_code = 413


class QueueFull(ExecutorError):
    status_code = 503

    def __init__(self, message: str, retry_after: int = 1) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class InvalidTransition(ExecutorError):
    status_code = 409


class SandboxError(ExecutorError):
    status_code = 500


class InstallError(ExecutorError):
    """A requirement could not be resolved or installed; the run ends ``failed``."""
