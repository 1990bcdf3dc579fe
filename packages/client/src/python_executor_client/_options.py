"""Keyword options of the client methods → validated wire models (no I/O).

The option names are the wire field names of ``Metadata`` and ``ExecutionConfig``;
a unit test keeps these ``TypedDict`` declarations equal to the models' fields.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, TypedDict, TypeVar

from pydantic import BaseModel, ValidationError

from .errors import InvalidInput
from .models import EvalFile, EvalRequest, ExecutionConfig, Metadata

__all__ = ["EvalOptions", "RunOptions", "build_eval", "build_metadata"]

EnvVars = Sequence[str] | Mapping[str, str]
EvalFiles = Mapping[str, str] | Sequence[EvalFile | Mapping[str, str]]
_Model = TypeVar("_Model", bound=BaseModel)


class LimitOptions(TypedDict, total=False):
    network_disabled: bool | None
    memory_mb: int | None
    disk_mb: int | None
    cpu_shares: int | None


class RunOptions(LimitOptions, total=False):
    """Metadata fields and config fields, accepted as keywords by ``execute_*``."""

    timeout_seconds: int | None
    entrypoint: str | None
    docker_image: str | None
    python_version: str | None
    requirements_txt: str | None
    pre_commands: Sequence[str] | None
    stdin: str | None
    env_vars: EnvVars | None
    script_args: Sequence[str] | None
    eval_last_expr: bool


class EvalOptions(LimitOptions, total=False):
    """Further ``EvalRequest`` fields accepted as keywords by ``eval``."""

    docker_image: str | None
    requirements_txt: str | None
    env_vars: EnvVars | None
    script_args: Sequence[str] | None


_CONFIG_FIELDS = frozenset(ExecutionConfig.model_fields)


def build_metadata(
    metadata: Metadata | None, options: Mapping[str, Any], default_entrypoint: str | None
) -> Metadata:
    """Merge keyword options over ``metadata``; the packer's entrypoint fills a gap."""
    fields, config = _split(options, frozenset(Metadata.model_fields) - {"config"})
    merged = _merge(Metadata, metadata, fields, config)
    if merged.entrypoint is None and default_entrypoint is not None:
        merged = merged.model_copy(update={"entrypoint": default_entrypoint})
    return merged


def build_eval(
    code: str | None,
    files: EvalFiles | None,
    eval_last_expr: bool,
    options: Mapping[str, Any],
) -> EvalRequest:
    """The ``/eval`` body; ``files`` wins over ``code``, as in the original client."""
    if files is None and code is None:
        raise InvalidInput("either code or files must be provided")
    fields, config = _split(options, frozenset(EvalRequest.model_fields) - {"config"})
    if files is not None:
        fields["files"] = _eval_files(files)
    else:
        fields["code"] = code
    fields["eval_last_expr"] = eval_last_expr
    return _merge(EvalRequest, None, fields, config)


def _split(
    options: Mapping[str, Any], allowed: frozenset[str]
) -> tuple[dict[str, Any], dict[str, Any]]:
    unknown = sorted(set(options) - allowed - _CONFIG_FIELDS)
    if unknown:
        raise TypeError(f"unexpected keyword argument {unknown[0]!r}")
    present = {name: value for name, value in options.items() if value is not None}
    if isinstance(present.get("env_vars"), Mapping):
        present["env_vars"] = [f"{key}={value}" for key, value in present["env_vars"].items()]
    fields = {name: value for name, value in present.items() if name not in _CONFIG_FIELDS}
    config = {name: value for name, value in present.items() if name in _CONFIG_FIELDS}
    return fields, config


def _merge(
    model: type[_Model], base: _Model | None, fields: dict[str, Any], config: dict[str, Any]
) -> _Model:
    data = base.model_dump(exclude_unset=True) if base is not None else {}
    data.update(fields)
    if config:
        data["config"] = {**(data.get("config") or {}), **config}
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise InvalidInput(_first_error(exc)) from None


def _eval_files(files: EvalFiles) -> list[dict[str, Any]]:
    if isinstance(files, Mapping):
        return [{"name": name, "content": content} for name, content in files.items()]
    return [item.model_dump() if isinstance(item, EvalFile) else dict(item) for item in files]


def _first_error(exc: ValidationError) -> str:
    error = exc.errors()[0]
    where = ".".join(str(part) for part in error.get("loc", ())) or "value"
    return f"invalid {where}: {error.get('msg', 'invalid value')}"
