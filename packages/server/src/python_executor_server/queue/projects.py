"""Exec projects across machines: an uncompressed tar in Redis, from the API node to the worker.

The API node extracted (and validated) the upload under its own data dir; a
worker on another machine cannot read that. So with the Redis queue,
``ship`` packs the extracted tree into an uncompressed tar (written to a file
beside it, never whole in memory), appends it to ``{ns}:project:{id}`` in
4 MiB chunks with a TTL, and the caller removes the local copy. ``fetch``, on
the worker, reads it back in chunks into its own staging dir, extracts it with
the same safe extractor as uploads and deletes the key. A project larger than
``max_bytes`` once packed is refused with 413 before anything is recorded.

Usage::

    projects = RedisProjects(raw_client, keys, max_bytes=256 << 20, ttl=86400, max_entries=100_000)
    await projects.ship("exe_…", Path(job.project_dir))
    job = await projects.fetch("exe_…", job, staging_dir)
"""

from __future__ import annotations

import functools
import os
import tarfile
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

import anyio

from ..errors import ExecutorError, PayloadTooLarge
from ..execution.jobs import Job
from ..upload.tarsafe import extract_tar
from .keys import RedisKeys

if TYPE_CHECKING:
    from redis.asyncio import Redis

CHUNK = 4 << 20


class _CappedWriter:
    """A write-only file object that refuses to grow past ``max_bytes``."""

    def __init__(self, raw: BinaryIO, max_bytes: int) -> None:
        self.raw = raw
        self.max_bytes = max_bytes
        self.size = 0

    def write(self, data: bytes) -> int:
        self.size += len(data)
        if self.size > self.max_bytes:
            raise PayloadTooLarge(
                f"the project is larger than {self.max_bytes} bytes once packed: the most this "
                "server moves from an API node to a worker (PYEXEC_REDIS_MAX_PROJECT_BYTES)"
            )
        return self.raw.write(data)

    def tell(self) -> int:
        return self.size


def _entries(root: Path) -> list[Path]:
    """Every directory, file and symlink under ``root`` (links not followed), parents first."""
    found: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        base = Path(dirpath)
        found += [base / name for name in dirnames + sorted(filenames)]
    return found


def pack_project(root: Path, target: Path, max_bytes: int) -> int:
    """Write ``root``'s tree to ``target`` as an uncompressed tar; its size. Blocking."""
    with target.open("wb") as raw:
        sink = _CappedWriter(raw, max_bytes)
        with tarfile.open(fileobj=sink, mode="w", format=tarfile.PAX_FORMAT) as tar:  # type: ignore[call-overload]
            for path in _entries(root):
                tar.add(path, arcname=path.relative_to(root).as_posix(), recursive=False)
    return sink.size


class RedisProjects:
    def __init__(
        self, raw: Redis, keys: RedisKeys, *, max_bytes: int, ttl: int, max_entries: int
    ) -> None:
        self._redis = raw  # a client with bytes replies
        self.keys = keys
        self.max_bytes = max_bytes
        self.ttl = ttl
        self.max_entries = max_entries

    async def ship(self, execution_id: str, project_dir: Path) -> None:
        tar_path = project_dir.with_name(project_dir.name + ".tar")
        key = self.keys.project(execution_id)
        try:
            pack = functools.partial(pack_project, project_dir, tar_path, self.max_bytes)
            await anyio.to_thread.run_sync(pack)
            await self._upload(tar_path, key)
        except BaseException:
            with anyio.CancelScope(shield=True):
                await self._redis.delete(key)
            raise
        finally:
            tar_path.unlink(missing_ok=True)

    async def _upload(self, tar_path: Path, key: str) -> None:
        await self._redis.delete(key)
        with tar_path.open("rb") as f:
            while chunk := await anyio.to_thread.run_sync(f.read, CHUNK):
                await self._redis.append(key, chunk)
        await self._redis.expire(key, self.ttl)

    async def fetch(self, execution_id: str, job: Job, staging: Path) -> Job:
        if job.project_dir is None:
            return job
        key = self.keys.project(execution_id)
        size = int(await self._redis.strlen(key))
        if size == 0:
            raise ExecutorError(
                "the project files of this execution are no longer in Redis "
                f"(kept {self.ttl} s, PYEXEC_REDIS_PROJECT_TTL); submit it again"
            )
        await anyio.Path(staging).mkdir(parents=True, exist_ok=True)
        tar_path = staging / "project.tar"
        await self._download(key, size, tar_path)
        extract = functools.partial(
            extract_tar, tar_path, staging / "project", max_entries=self.max_entries
        )
        project = await anyio.to_thread.run_sync(extract)
        await anyio.Path(tar_path).unlink()
        await self._redis.delete(key)
        return replace(job, project_dir=str(project.root))

    async def _download(self, key: str, size: int, tar_path: Path) -> None:
        with tar_path.open("wb") as f:
            for start in range(0, size, CHUNK):
                chunk = await self._redis.getrange(key, start, min(start + CHUNK, size) - 1)
                if not isinstance(chunk, bytes):
                    raise TypeError("project chunks must be read with a bytes client")
                await anyio.to_thread.run_sync(f.write, chunk)

    async def drop(self, execution_id: str) -> None:
        await self._redis.delete(self.keys.project(execution_id))
