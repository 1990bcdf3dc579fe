"""Keyword options → wire models, the sans-I/O request building, and the CLI's arg split."""

from __future__ import annotations

import json
from typing import get_type_hints

import pytest
from python_executor_client import (
    EvalOptions,
    ExecutionConfig,
    ExecutionResult,
    InvalidInput,
    Metadata,
    RunOptions,
)
from python_executor_client._base import submit_call
from python_executor_client._options import build_eval, build_metadata
from python_executor_client._packing import pack_files
from python_executor_client.cli import split_script_args
from python_executor_client.cli.inputs import resolve_env
from python_executor_client.models import EvalRequest


def test_keyword_options_are_exactly_the_wire_fields() -> None:
    wire = set(Metadata.model_fields) - {"config"} | set(ExecutionConfig.model_fields)
    assert set(get_type_hints(RunOptions)) == wire
    eval_wire = set(EvalRequest.model_fields) | set(ExecutionConfig.model_fields)
    assert set(get_type_hints(EvalOptions)) <= eval_wire


def test_options_merge_over_metadata_and_fill_the_entrypoint() -> None:
    base = Metadata(stdin="in", config=ExecutionConfig(memory_mb=256))
    merged = build_metadata(
        base, {"timeout_seconds": 5, "env_vars": {"A": "1"}, "disk_mb": None}, "main.py"
    )
    assert merged.entrypoint == "main.py" and merged.stdin == "in" and merged.env_vars == ["A=1"]
    assert merged.config == ExecutionConfig(memory_mb=256, timeout_seconds=5)


def test_unknown_keyword_is_a_type_error_and_bad_value_invalid_input() -> None:
    with pytest.raises(TypeError, match="memory"):
        build_metadata(None, {"memory": 5}, None)
    with pytest.raises(InvalidInput, match="timeout_seconds"):
        build_metadata(None, {"timeout_seconds": "soon"}, None)


def test_eval_files_win_over_code_like_the_original() -> None:
    request = build_eval("1", {"a.py": "2"}, True, {})
    assert request.code is None and request.files is not None and request.files[0].name == "a.py"


def test_multipart_body_has_the_promised_length_and_metadata_first() -> None:
    seen: list[tuple[int, int]] = []
    call = submit_call(
        True,
        pack_files({"main.py": "print(1)"}),
        Metadata(entrypoint="main.py"),
        lambda sent, total: seen.append((sent, total)),
    )
    assert call.stream is not None and call.headers is not None
    body = b"".join(call.stream())
    assert len(body) == int(call.headers["Content-Length"]) == seen[-1][0] == seen[-1][1]
    assert body.index(b'name="metadata"') < body.index(b'name="tar"')


def test_result_keeps_the_original_from_dict() -> None:
    data = {"execution_id": "exe_1", "status": "completed", "started_at": "2026-01-02T03:04:05Z"}
    result = ExecutionResult.from_dict(data)
    assert result.started_at is not None and result.started_at.year == 2026
    assert json.loads(Metadata(entrypoint="m.py").model_dump_json())["entrypoint"] == "m.py"


def test_script_args_are_everything_after_the_first_double_dash() -> None:
    assert split_script_args(["run", "x.py", "--", "-v", "--", "a b"]) == (
        ["run", "x.py"],
        ["-v", "--", "a b"],
    )
    assert split_script_args(["list"]) == (["list"], [])


def test_env_entries_copy_ours_or_take_the_value() -> None:
    assert resolve_env(["A", "B=x=y"], {"A": "from env"}) == ["A=from env", "B=x=y"]
    with pytest.raises(InvalidInput, match="MISSING"):
        resolve_env(["MISSING"], {})
