"""The installed distribution's version (one source: packages/client/pyproject.toml)."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("python-executor-client")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0"
