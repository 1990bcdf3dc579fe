"""Sandbox backends: ``bwrap`` (embedded default) and ``docker``."""

from __future__ import annotations

from collections.abc import Mapping

from ..settings import Settings
from .base import Interpreter, SandboxBackend


def create_backend(settings: Settings, interpreters: Mapping[str, Interpreter]) -> SandboxBackend:
    if settings.sandbox == "docker":
        from .docker import DockerBackend

        return DockerBackend(settings)
    from .bwrap import BwrapBackend

    return BwrapBackend(settings, interpreters)
