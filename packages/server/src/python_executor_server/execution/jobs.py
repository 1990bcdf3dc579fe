"""Turning a request (exec metadata or eval body) into a validated ``Job``.

A ``Job`` is everything a runner needs, already checked against the server's
limits, and JSON-able (``to_dict``/``from_dict``) so it can cross to a worker.

Usage::

    job = JobBuilder(settings, interpreters).from_eval(EvalRequest(code="1+1"))
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

from python_executor_client.models import EvalRequest, ExecutionConfig, Metadata

from ..errors import BadRequest, PayloadTooLarge
from ..sandbox.base import Interpreter
from ..settings import Settings
from .interpreters import default_version
from .requirements import parse_requirements

_ENV_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_IMAGE_VERSION = re.compile(r"^python:(3\.\d+)")


@dataclass(frozen=True)
class JobLimits:
    timeout_seconds: int
    memory_mb: int
    disk_mb: int
    cpu_shares: int
    network: bool


@dataclass(frozen=True)
class Job:
    kind: str  # "exec" | "eval"
    entrypoint: str  # relative to the project root
    python_version: str
    limits: JobLimits
    files: tuple[tuple[str, str], ...] = ()  # eval: (name, content)
    project_dir: str | None = None  # exec: the extracted upload (host path)
    image: str | None = None
    requirements_txt: str | None = None
    auto_detect: bool = False
    pre_commands: tuple[str, ...] = ()
    stdin: str | None = None
    env: tuple[tuple[str, str], ...] = ()
    args: tuple[str, ...] = ()
    eval_last_expr: bool = False
    extra: Mapping[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        # By hand: ``dataclasses.asdict`` deep-copies every tuple (~20x slower, 50 µs a job).
        values = {name: getattr(self, name) for name in _JOB_FIELDS}
        values["limits"] = {name: getattr(self.limits, name) for name in _LIMIT_FIELDS}
        values["extra"] = dict(self.extra)
        return values

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Job:
        values = dict(data)
        values["limits"] = JobLimits(**values["limits"])
        for key in ("files", "env"):
            values[key] = tuple(tuple(pair) for pair in values.get(key, ()))
        for key in ("pre_commands", "args"):
            values[key] = tuple(values.get(key, ()))
        return cls(**values)


_JOB_FIELDS = tuple(f.name for f in fields(Job))
_LIMIT_FIELDS = tuple(f.name for f in fields(JobLimits))


class JobBuilder:
    def __init__(self, settings: Settings, interpreters: Mapping[str, Interpreter]) -> None:
        self.settings = settings
        self.interpreters = interpreters

    def from_metadata(self, meta: Metadata, project_dir: str, files: Sequence[str]) -> Job:
        version = self._python_version(meta.python_version, meta.docker_image)
        return Job(
            kind="exec",
            entrypoint=self._entrypoint(meta.entrypoint, files),
            python_version=version,
            limits=self._limits(meta.config),
            project_dir=project_dir,
            image=self._image(meta.docker_image, meta.python_version),
            requirements_txt=_checked_requirements(meta.requirements_txt),
            pre_commands=tuple(meta.pre_commands or ()),
            stdin=meta.stdin,
            env=self._env(meta.env_vars),
            args=tuple(meta.script_args or ()),
            eval_last_expr=meta.eval_last_expr,
        )

    def from_eval(self, body: EvalRequest) -> Job:
        files = self._eval_files(body)
        names = [name for name, _ in files]
        explicit = body.entrypoint or (None if body.code is not None else names[0])
        requirements = body.requirements_txt
        return Job(
            kind="eval",
            entrypoint=self._entrypoint(explicit, names),
            python_version=self._python_version(body.python_version, body.docker_image),
            limits=self._limits(body.config),
            files=files,
            image=self._image(body.docker_image, body.python_version),
            requirements_txt=None if requirements == "-" else _checked_requirements(requirements),
            auto_detect=self.settings.auto_detect_imports and requirements != "-",
            stdin=body.stdin,
            env=self._env(body.env_vars),
            args=tuple(body.script_args or ()),
            eval_last_expr=body.eval_last_expr,
        )

    def _eval_files(self, body: EvalRequest) -> tuple[tuple[str, str], ...]:
        files: list[tuple[str, str]] = []
        if body.code is not None:
            files.append(("main.py", body.code))
        for item in body.files or ():
            files.append((check_relative_path(item.name), item.content))
        if not files:
            raise BadRequest("one of 'code' or 'files' is required")
        size = sum(len(content.encode()) for _, content in files)
        if size > self.settings.max_eval_code_bytes:
            raise PayloadTooLarge(
                f"code is {size} bytes; the maximum is {self.settings.max_eval_code_bytes} bytes"
            )
        return tuple(files)

    def _entrypoint(self, explicit: str | None, files: Sequence[str]) -> str:
        if explicit:
            path = check_relative_path(explicit)
            if path not in files:
                raise BadRequest(f"entrypoint {explicit!r} is not a file of the project")
            return path
        for candidate in ("main.py", "__main__.py"):
            if candidate in files:
                return candidate
        for name in files:
            if name.endswith(".py"):
                return name
        raise BadRequest("no entrypoint: the project has no main.py, __main__.py or other .py file")

    def _image(self, docker_image: str | None, python_version: str | None) -> str | None:
        """On the Docker backend: the allowed image to run (400 for any other)."""
        if self.settings.sandbox != "docker":
            return docker_image
        from ..sandbox.docker import resolve_image

        return resolve_image(self.settings, docker_image, python_version)

    def _python_version(self, requested: str | None, image: str | None) -> str:
        version = requested
        if version is None and image and self.settings.sandbox != "docker":
            match = _IMAGE_VERSION.match(image)
            version = match.group(1) if match else None
        if version is None:
            return default_version(self.settings, self.interpreters)
        if self.settings.sandbox == "docker":
            return version  # the image decides; ``_image`` rejects an unknown version
        if version not in self.interpreters:
            available = ", ".join(self.interpreters) or "none"
            raise BadRequest(f"python_version {version!r} is not available; available: {available}")
        return version

    def _limits(self, config: ExecutionConfig | None) -> JobLimits:
        c = config or ExecutionConfig()
        s = self.settings
        return JobLimits(
            timeout_seconds=_bounded(
                "timeout_seconds", c.timeout_seconds, s.default_timeout, s.max_timeout
            ),
            memory_mb=_bounded("memory_mb", c.memory_mb, s.default_memory_mb, s.max_memory_mb),
            disk_mb=_bounded("disk_mb", c.disk_mb, s.default_disk_mb, s.max_disk_mb),
            cpu_shares=_bounded("cpu_shares", c.cpu_shares, s.default_cpu_shares, s.max_cpu_shares),
            network=c.network_disabled is False,
        )

    def _env(self, entries: Sequence[str] | None) -> tuple[tuple[str, str], ...]:
        env: list[tuple[str, str]] = []
        for entry in entries or ():
            key, sep, value = entry.partition("=")
            if not sep or not _ENV_KEY.match(key):
                raise BadRequest(f"env_vars entry {entry!r} is not of the form KEY=value")
            if "\0" in value:
                raise BadRequest(f"env_vars entry for {key!r} contains a NUL byte")
            env.append((key, value))
        return tuple(env)


def _bounded(name: str, value: int | None, default: int, maximum: int) -> int:
    if value is None:
        return default
    if value <= 0:
        raise BadRequest(f"config.{name} must be a positive number, got {value}")
    if value > maximum:
        raise BadRequest(f"config.{name} is {value}; the server's maximum is {maximum}")
    return value


def _checked_requirements(text: str | None) -> str | None:
    """Reject option lines, URLs and paths now (400), not when the run starts."""
    if text:
        parse_requirements(text)
    return text


def check_relative_path(name: str) -> str:
    """A normalised relative POSIX path inside the project, or 400."""
    parts = [p for p in name.replace("\\", "/").split("/") if p not in ("", ".")]
    if not parts or name.startswith("/") or ".." in parts or "\0" in name:
        raise BadRequest(f"file name {name!r} must be a relative path inside the project")
    return "/".join(parts)
