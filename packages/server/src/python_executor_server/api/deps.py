"""What route handlers get from the app: the service, the job builder, settings."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from fastapi import Request

from ..execution.jobs import JobBuilder
from ..execution.metrics import Metrics
from ..execution.service import ExecutionService
from ..sandbox.base import SandboxBackend
from ..settings import Settings


@dataclass(frozen=True)
class Services:
    settings: Settings
    service: ExecutionService
    builder: JobBuilder
    backend: SandboxBackend
    metrics: Metrics
    health: dict[str, Any]


def services(request: Request) -> Services:
    found: Services = request.app.state.services
    return found
