"""Execution routes: exec (sync/async), eval, get, kill, list, live logs."""

from __future__ import annotations

import shutil
from collections.abc import AsyncIterator
from typing import Any

import anyio
from fastapi import APIRouter, Query, Request
from fastapi.responses import StreamingResponse
from pydantic import ValidationError
from python_executor_client.models import (
    ErrorResponse,
    EvalRequest,
    ExecutionList,
    ExecutionResult,
    ExecutionStatus,
    LogChunk,
    LogEventType,
    Metadata,
    SubmitResponse,
)

from ..errors import BadRequest
from ..execution.jobs import Job
from ..execution.output import LogEvent
from ..store.base import new_execution_id
from ..upload.multipart import receive_exec_upload
from .deps import Services, services

_ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorResponse, "description": "Invalid request (the error names what)."},
    404: {"model": ErrorResponse, "description": "Unknown execution id."},
    413: {"model": ErrorResponse, "description": "Body or code over the configured maximum."},
    503: {"model": ErrorResponse, "description": "Queue full; retry after `Retry-After` s."},
}
_SERVER_TIMING_DOC = {
    "description": "total;dur=<ms>, run;dur=<ms>: the request's time in the server "
    "(first bytes read to answer written) and the run's (started_at to finished_at)",
    "schema": {"type": "string"},
}
router = APIRouter(prefix="/api/v1", tags=["executions"], responses=_ERRORS)

_MULTIPART_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["tar", "metadata"],
                    "properties": {
                        "tar": {
                            "type": "string",
                            "format": "binary",
                            "description": "Uncompressed tar archive of the project.",
                        },
                        "metadata": {
                            "type": "string",
                            "description": "JSON text of the Metadata object.",
                        },
                    },
                }
            }
        },
    }
}


async def _exec_job(request: Request, svc: Services) -> tuple[str, Job]:
    """Stream the upload, checking and extracting it as it arrives; build the job (400/413)."""
    execution_id = new_execution_id()
    staging = svc.service.staging_dir(execution_id)
    try:
        staging.mkdir(parents=True)
        upload = await receive_exec_upload(
            request,
            staging,
            max_bytes=svc.settings.max_upload_bytes,
            max_entries=svc.settings.max_archive_entries,
        )
        try:
            meta = Metadata.model_validate_json(upload.metadata)
        except ValidationError as exc:
            raise BadRequest(f"invalid metadata: {_first_error(exc)}") from None
        project = upload.project
        return execution_id, svc.builder.from_metadata(meta, str(project.root), project.files)
    except BaseException:
        await anyio.to_thread.run_sync(lambda: shutil.rmtree(staging, ignore_errors=True))
        raise


def _first_error(exc: ValidationError) -> str:
    err = exc.errors()[0]
    where = ".".join(str(p) for p in err.get("loc", ())) or "body"
    return f"{where}: {err.get('msg', 'invalid')}"


@router.post(
    "/exec/sync",
    response_model=ExecutionResult,
    openapi_extra=_MULTIPART_BODY,
    summary="Run a project (uncompressed tar + metadata) and wait for the result",
)
async def exec_sync(request: Request) -> ExecutionResult:
    svc = services(request)
    execution_id, job = await _exec_job(request, svc)
    record = await svc.service.run_sync(job, execution_id)
    return record.to_result()


@router.post(
    "/exec/async",
    status_code=202,
    response_model=SubmitResponse,
    openapi_extra=_MULTIPART_BODY,
    summary="Submit a project; poll GET /executions/{id} for the result",
)
async def exec_async(request: Request) -> SubmitResponse:
    svc = services(request)
    execution_id, job = await _exec_job(request, svc)
    record = await svc.service.submit(job, execution_id)
    return SubmitResponse(execution_id=record.execution_id)


@router.post(
    "/eval",
    response_model=ExecutionResult,
    summary="Run code given as JSON",
    responses={200: {"headers": {"Server-Timing": _SERVER_TIMING_DOC}}},
)
async def eval_code(body: EvalRequest, request: Request) -> ExecutionResult:
    return await run_eval(services(request), body)


async def run_eval(svc: Services, body: EvalRequest) -> ExecutionResult:
    """An eval, start to finish (this route and ``eval_route.EvalRoute`` both call it)."""
    record = await svc.service.run_sync(svc.builder.from_eval(body))
    return record.to_result()


@router.get("/executions/{execution_id}", response_model=ExecutionResult)
async def get_execution(execution_id: str, request: Request) -> ExecutionResult:
    return (await services(request).service.get(execution_id)).to_result()


@router.delete(
    "/executions/{execution_id}",
    summary="Kill a pending or running execution",
    responses={200: {"content": {"application/json": {"example": {"status": "killed"}}}}},
)
async def kill_execution(execution_id: str, request: Request) -> dict[str, str]:
    status = await services(request).service.kill(execution_id)
    return {"status": status.value}


@router.get("/executions", response_model=ExecutionList, summary="List executions, newest first")
async def list_executions(
    request: Request,
    status: ExecutionStatus | None = None,
    limit: int = Query(50, ge=1, le=500),
    cursor: str | None = None,
) -> ExecutionList:
    records, next_cursor = await services(request).service.list(status, limit, cursor)
    return ExecutionList(executions=[r.to_result() for r in records], next_cursor=next_cursor)


@router.get(
    "/executions/{execution_id}/logs",
    summary="Live output as Server-Sent Events (stdout, stderr, exit)",
    response_class=StreamingResponse,
    responses={200: {"content": {"text/event-stream": {}}}},
)
async def execution_logs(execution_id: str, request: Request) -> StreamingResponse:
    service = services(request).service
    await service.get(execution_id)  # 404 before the stream starts

    async def events() -> AsyncIterator[str]:
        async for item in service.follow(execution_id):
            if isinstance(item, LogEvent):
                yield _sse(item.stream, LogChunk(data=item.text).model_dump_json())
            else:
                yield _sse(LogEventType.EXIT, item.to_result().model_dump_json())

    headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    return StreamingResponse(events(), media_type="text/event-stream", headers=headers)


def _sse(event: str, data: str) -> str:
    return f"event: {event}\ndata: {data}\n\n"
