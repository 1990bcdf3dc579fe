"""What the caller has (a dict, paths, a directory, a tar) → an uncompressed tar upload.

Nothing is held whole in memory beyond what the caller already handed over as bytes:
a directory becomes a plan of members (name, size, mode) whose exact archive size is
known before the first byte is read; the bytes are produced by a generator that reads
each file in chunks while the upload consumes them.

Usage::

    upload = pack_path("./project")
    upload.size, upload.entrypoint        # exact byte count, "main.py"
    for chunk in upload.chunks(): ...
"""

from __future__ import annotations

import os
import posixpath
import tarfile
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from .errors import InvalidInput

__all__ = [
    "CHUNK_SIZE",
    "FilesInput",
    "PathInput",
    "TarInput",
    "Upload",
    "detect_entrypoint",
    "pack",
    "pack_files",
    "pack_path",
    "pack_paths",
    "pack_tar",
]

CHUNK_SIZE = 64 * 1024
_BLOCK = tarfile.BLOCKSIZE
_RECORD = tarfile.RECORDSIZE

PathInput = str | os.PathLike[str]
FilesInput = Mapping[str, str | bytes] | PathInput | Sequence[PathInput]
TarInput = bytes | PathInput


@dataclass(frozen=True)
class Upload:
    """An uncompressed tar archive ready to send.

    ``chunks()`` starts a fresh pass over the archive each time it is called;
    ``blocking`` says whether producing chunks reads from disk.
    """

    size: int
    chunks: Callable[[], Iterator[bytes]]
    names: tuple[str, ...] = ()
    entrypoint: str | None = None
    blocking: bool = False


@dataclass(frozen=True)
class _Member:
    name: str
    mtime: float
    size: int = 0
    mode: int = 0o644
    data: bytes | None = None
    path: str | None = None
    is_dir: bool = False


def detect_entrypoint(names: Iterable[str]) -> str | None:
    """The server's rule: ``main.py``, else ``__main__.py``, else the first ``.py`` file."""
    names = list(names)
    for preferred in ("main.py", "__main__.py"):
        if preferred in names:
            return preferred
    return next((name for name in names if name.endswith(".py")), None)


def pack(files: FilesInput | None = None, tar_data: TarInput | None = None) -> Upload:
    """The client's ``files=`` / ``tar_data=`` arguments → an upload (``tar_data`` wins).

    ``files`` is a mapping name → content, one path (a file or a directory), or a
    list of paths kept at their paths relative to the working directory.
    """
    if tar_data is not None:
        return pack_tar(tar_data)
    if files is None:
        raise InvalidInput("either files or tar_data must be provided")
    if isinstance(files, Mapping):
        return pack_files(files)
    if isinstance(files, str | os.PathLike):
        return pack_path(files)
    return pack_paths(files)


def pack_files(files: Mapping[str, str | bytes]) -> Upload:
    """A mapping of archive name → content (text is encoded as UTF-8)."""
    if not files:
        raise InvalidInput("files is empty: nothing to run")
    now = time.time()
    members = []
    for name, content in files.items():
        data = content.encode() if isinstance(content, str) else bytes(content)
        members.append(_Member(_clean_name(name), now, size=len(data), data=data))
    return _archive(members)


def pack_path(path: PathInput) -> Upload:
    """A single file (archived under its own name, and the entrypoint) or a directory tree."""
    source = Path(path)
    if source.is_dir():
        return _archive(_walk(source, ""))
    if source.is_file():
        upload = _archive([_file_member(source, source.name)])
        return _with_entrypoint(upload, source.name)
    raise InvalidInput(f"no such file or directory: {source}")


def pack_paths(paths: Sequence[PathInput], base: PathInput | None = None) -> Upload:
    """Several files or directories, each kept at its path relative to ``base`` (cwd).

    A path outside ``base`` (absolute elsewhere, or through ``..``) is archived
    under its last component.
    """
    if not paths:
        raise InvalidInput("no files given: nothing to run")
    root = Path(base) if base is not None else Path.cwd()
    members: list[_Member] = []
    for path in paths:
        source = root / path  # an absolute path stays itself
        name = _relative_name(source, root)
        if source.is_dir():
            members.extend(_walk(source, name + "/" if name else ""))
        elif source.is_file():
            members.append(_file_member(source, name))
        else:
            raise InvalidInput(f"no such file or directory: {source}")
    _reject_duplicates(members)
    upload = _archive(members)
    if len(paths) == 1 and (root / paths[0]).is_file():
        return _with_entrypoint(upload, upload.names[0])
    return upload


def pack_tar(tar_data: TarInput) -> Upload:
    """An existing uncompressed tar: bytes, or a path streamed from disk.

    The archive is sent as is: the server checks it and picks the entrypoint.
    """
    if isinstance(tar_data, bytes | bytearray | memoryview):
        data = bytes(tar_data)
        return Upload(size=len(data), chunks=lambda: _slices(data))
    source = Path(tar_data)
    if not source.is_file():
        raise InvalidInput(f"no such tar file: {source}")
    size = source.stat().st_size
    return Upload(size=size, chunks=lambda: _read_exactly(str(source), size), blocking=True)


def _with_entrypoint(upload: Upload, entrypoint: str) -> Upload:
    return Upload(upload.size, upload.chunks, upload.names, entrypoint, upload.blocking)


def _clean_name(name: str) -> str:
    cleaned = posixpath.normpath(name) if name else ""
    if cleaned in ("", "."):
        raise InvalidInput(f"invalid file name: {name!r}")
    return cleaned


def _relative_name(source: Path, root: Path) -> str:
    absolute = Path(os.path.abspath(source))
    try:
        relative = absolute.relative_to(os.path.abspath(root))
    except ValueError:
        return absolute.name
    return relative.as_posix() if relative.parts else ""


def _reject_duplicates(members: Sequence[_Member]) -> None:
    seen: set[str] = set()
    for member in members:
        if member.name in seen and not member.is_dir:
            raise InvalidInput(f"{member.name!r} is given more than once")
        seen.add(member.name)


def _file_member(path: Path, name: str) -> _Member:
    if not os.access(path, os.R_OK):
        raise InvalidInput(f"cannot read {path}: permission denied")
    stat = path.stat()
    mode = 0o755 if stat.st_mode & 0o111 else 0o644
    return _Member(name, stat.st_mtime, size=stat.st_size, mode=mode, path=str(path))


def _walk(directory: Path, prefix: str) -> Iterator[_Member]:
    """Files of a directory (sorted, symlinks to files followed), then its subdirectories."""
    with os.scandir(directory) as scan:
        entries = sorted(scan, key=lambda entry: entry.name)
    subdirectories = []
    for entry in entries:
        if entry.is_dir(follow_symlinks=False):
            subdirectories.append(entry)
        elif entry.is_file():
            yield _file_member(Path(entry.path), prefix + entry.name)
    for entry in subdirectories:
        name = prefix + entry.name
        yield _Member(name, entry.stat(follow_symlinks=False).st_mtime, mode=0o755, is_dir=True)
        yield from _walk(Path(entry.path), name + "/")


def _header(member: _Member) -> bytes:
    info = tarfile.TarInfo(member.name)
    info.type = tarfile.DIRTYPE if member.is_dir else tarfile.REGTYPE
    info.size = member.size
    info.mode = member.mode
    info.mtime = int(member.mtime)
    return info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")


def _padding(size: int) -> int:
    return -size % _BLOCK


def _archive(members: Iterable[_Member]) -> Upload:
    planned = tuple(members)
    body = sum(len(_header(m)) + m.size + _padding(m.size) for m in planned) + 2 * _BLOCK
    size = body + -body % _RECORD  # tarfile pads to a whole record too
    return Upload(
        size=size,
        chunks=lambda: _stream(planned, size),
        names=tuple(m.name for m in planned if not m.is_dir),
        entrypoint=detect_entrypoint(m.name for m in planned if not m.is_dir),
        blocking=any(m.path is not None for m in planned),
    )


def _stream(members: Sequence[_Member], size: int) -> Iterator[bytes]:
    sent = 0
    for member in members:
        header = _header(member)
        yield header
        sent += len(header)
        if member.data is not None:
            yield from _slices(member.data)
        elif member.path is not None:
            yield from _read_exactly(member.path, member.size)
        sent += member.size + _padding(member.size)
        yield from _zeros(_padding(member.size))
    yield from _zeros(size - sent)  # end-of-archive blocks and record padding


def _slices(data: bytes) -> Iterator[bytes]:
    for start in range(0, len(data), CHUNK_SIZE):
        yield data[start : start + CHUNK_SIZE]


def _read_exactly(path: str, size: int) -> Iterator[bytes]:
    """``size`` bytes of a file, even if it changed since it was planned (truncated / padded)."""
    remaining = size
    with open(path, "rb") as file:
        while remaining:
            chunk = file.read(min(CHUNK_SIZE, remaining))
            if not chunk:
                break
            remaining -= len(chunk)
            yield chunk
    yield from _zeros(remaining)


def _zeros(count: int) -> Iterator[bytes]:
    while count > 0:
        step = min(count, CHUNK_SIZE)
        yield bytes(step)
        count -= step
