"""Safe extraction of an uploaded, uncompressed tar archive.

Every member header is checked in a full pass over the archive before
anything is written; only then are the members extracted, with tarfile's
``data`` filter as a second line of defence. Rejected with
:class:`~python_executor_server.errors.UnsafeArchive` (400 naming the entry):
absolute paths, ``..`` components, hard links (all of them), device nodes,
FIFOs, sparse files, unknown entry types, paths too long or too deep, symlinks
whose target is absolute or resolves outside the root (following the
archive's other symlinks, in the archive's final state), and any entry whose
path passes through a symlink or replaces one (the Judge0 2024 escapes wrote
through symlinked directories). BadRequest: more than ``max_entries`` entries
(parent directories included), a body tarfile cannot read, data after the end
of the archive, oversized pax / GNU long-name headers.

Usage (``extract_tar`` blocks: run it in a worker thread)::

    project = await anyio.to_thread.run_sync(
        functools.partial(extract_tar, upload.tar_path, workdir / "project", max_entries=100_000)
    )
    entrypoint = metadata.entrypoint or detect_entrypoint(project.files)

``dest`` is created only once validation has passed. If extraction then fails
midway (disk full, ...), what was already written stays: the caller removes
``dest``.
"""

from __future__ import annotations

import os
import tarfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from python_executor_server import errors
from python_executor_server.upload.tartree import ArchiveTree, Kind, too_many_entries

_MAGIC = (
    (b"\x1f\x8b", "gzip"),
    (b"PK\x03\x04", "zip"),
    (b"PK\x05\x06", "zip"),
    (b"BZh", "bzip2"),
    (b"\xfd7zXZ\x00", "xz"),
    (b"\x28\xb5\x2f\xfd", "zstd"),
    (b"7z\xbc\xaf\x27\x1c", "7z"),
)
SNIFF_BYTES = 512
# pax / GNU long-name headers are read whole into memory by tarfile; real ones are tiny.
_MAX_EXTENDED_HEADER = 1 << 20
_PAX_TYPES = (tarfile.XHDTYPE, tarfile.XGLTYPE, tarfile.SOLARIS_XHDTYPE)
_EXTENDED_TYPES = (*_PAX_TYPES, tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK)
# tarfile copies the global pax records into every member: keep that copy small.
_MAX_GLOBAL_PAX_RECORDS = 64
_MAX_NAME_BYTES = 255
_MAX_PATH_BYTES = 4095
_MAX_DEPTH = 128  # tarfile creates parents with os.makedirs, which recurses per level
_MAX_MTIME = 2**33


@dataclass(frozen=True)
class ExtractedProject:
    root: Path
    files: tuple[str, ...]  # regular files, relative POSIX paths, in archive order


def sniff_compression(head: bytes) -> str | None:
    """Name the compressed or non-tar archive format ``head`` starts with, else None.

    ``head`` should be the first :data:`SNIFF_BYTES` bytes when available: a
    valid tar header there wins over a magic number (a file named ``BZh...``).
    """
    if len(head) >= SNIFF_BYTES and _is_tar_header(head[:SNIFF_BYTES]):
        return None
    return next((name for magic, name in _MAGIC if head.startswith(magic)), None)


def _is_tar_header(block: bytes) -> bool:
    field = block[148:156].split(b"\0", 1)[0].strip()
    try:
        stored = int(field, 8)
    except ValueError:
        return False
    return stored == sum(block[:148]) + 8 * 0x20 + sum(block[156:])


def detect_entrypoint(files: Sequence[str]) -> str | None:
    """``main.py``, else ``__main__.py`` (both at the root), else the first ``.py`` file."""
    present = set(files)
    for name in ("main.py", "__main__.py"):
        if name in present:
            return name
    return next((name for name in files if name.endswith(".py")), None)


def extract_tar(
    tar_path: Path,
    dest: Path,
    *,
    max_entries: int,
    uid: int | None = None,
    gid: int | None = None,
) -> ExtractedProject:
    """Validate every member of ``tar_path``, then extract it into ``dest``.

    Blocking. Files get at most mode 0o755 (no setuid/setgid); with ``uid`` or
    ``gid`` everything under ``dest``, ``dest`` included, is chowned to them.
    """
    _reject_compressed(tar_path)
    if tar_path.stat().st_size == 0:  # like GNU tar: an empty file is an empty archive
        _populate(dest, uid, gid)
        return ExtractedProject(root=dest, files=())
    with _reading(), _open(tar_path) as archive:
        members, tree = _validate(archive, max_entries)
        _check_trailer(tar_path, archive.offset)
        _populate(dest, uid, gid, archive, members)
    return ExtractedProject(root=dest, files=tuple(tree.files))


def _reject_compressed(tar_path: Path) -> None:
    with tar_path.open("rb") as f:
        kind = sniff_compression(f.read(SNIFF_BYTES))
    if kind is not None:
        raise errors.UnsupportedArchive(f"only uncompressed tar archives are accepted (got {kind})")


@contextmanager
def _reading() -> Iterator[None]:
    try:
        yield
    except (tarfile.ReadError, tarfile.HeaderError, EOFError) as exc:
        raise errors.BadRequest(f"the tar archive could not be read: {exc}") from exc


class _CappedTarInfo(tarfile.TarInfo):
    """Refuses what would make tarfile's header parsing costly, before tarfile reads it."""

    def _proc_member(self, tarfile_: tarfile.TarFile) -> tarfile.TarInfo:
        if self.type == tarfile.GNUTYPE_SPARSE:  # its extension blocks run to any length
            raise errors.UnsafeArchive(self.name, "sparse files are not allowed")
        if self.type in _EXTENDED_TYPES:
            _check_extended_header(self, tarfile_)
        result: tarfile.TarInfo = super()._proc_member(tarfile_)  # type: ignore[misc]
        if len(tarfile_.pax_headers) > _MAX_GLOBAL_PAX_RECORDS:
            raise errors.BadRequest(
                f"the tar archive has more than {_MAX_GLOBAL_PAX_RECORDS} global pax records"
            )
        result.pax_headers = {}  # already applied; kept, they would cost memory per member
        return result


def _check_extended_header(info: tarfile.TarInfo, archive: tarfile.TarFile) -> None:
    if info.size > _MAX_EXTENDED_HEADER:
        raise errors.BadRequest(
            f"the tar archive could not be read: an extended header of {info.size} bytes "
            f"(more than {_MAX_EXTENDED_HEADER})"
        )
    if info.type in _PAX_TYPES:
        source = archive.fileobj
        assert source is not None
        start = source.tell()
        records = source.read(info.size)
        source.seek(start)
        if b" GNU.sparse." in records:  # tarfile would read a sparse map of any length
            raise errors.BadRequest("sparse files are not allowed in the archive")


def _open(tar_path: Path) -> tarfile.TarFile:
    # "r:" never decompresses: a compressed body is an error, not a bomb.
    return tarfile.open(tar_path, "r:", tarinfo=_CappedTarInfo)


# --- validation ---------------------------------------------------------------


def _validate(
    archive: tarfile.TarFile, max_entries: int
) -> tuple[list[tarfile.TarInfo], ArchiveTree]:
    tree = ArchiveTree(max_nodes=max_entries)
    members: list[tarfile.TarInfo] = []
    for count, member in enumerate(archive, start=1):
        if count > max_entries:
            raise too_many_entries(max_entries)
        parts = _normalise(member.name)
        kind = _kind(member)
        if not parts:  # "./": the root itself
            if kind != "dir":
                raise errors.UnsafeArchive(member.name, "it would replace the archive root")
            continue
        if kind == "symlink":
            _check_link_target(member)
        tree.add(member.name, parts, kind, member.linkname)
        members.append(member)
    tree.check_links()
    return members, tree


def _normalise(name: str) -> list[str]:
    if name.startswith("/"):
        raise errors.UnsafeArchive(name, "absolute paths are not allowed")
    parts = [part for part in name.split("/") if part not in ("", ".")]
    if ".." in parts:
        raise errors.UnsafeArchive(name, "'..' path components are not allowed")
    encoded = [part.encode("utf-8", "surrogateescape") for part in parts]
    too_long = len(b"/".join(encoded)) > _MAX_PATH_BYTES
    if too_long or any(len(part) > _MAX_NAME_BYTES for part in encoded):
        raise errors.UnsafeArchive(name, "its path is too long")
    if len(parts) > _MAX_DEPTH:
        raise errors.UnsafeArchive(name, f"its path is more than {_MAX_DEPTH} levels deep")
    return parts


def _kind(member: tarfile.TarInfo) -> Kind:
    if member.isdir():
        return "dir"
    if member.issym():
        return "symlink"
    if member.isreg() and member.sparse is None:
        return "file"
    raise errors.UnsafeArchive(member.name, _refusal(member))


def _refusal(member: tarfile.TarInfo) -> str:
    if member.islnk():
        return f"hard links are not allowed (to {member.linkname!r})"
    if member.isdev() and not member.isfifo():
        return "device nodes are not allowed"
    if member.isfifo():
        return "FIFOs are not allowed"
    if member.isreg():
        return "sparse files are not allowed"
    return f"entries of type {member.type!r} are not supported"


def _check_link_target(member: tarfile.TarInfo) -> None:
    if not member.linkname:
        raise errors.UnsafeArchive(member.name, "the symlink has an empty target")
    if member.linkname.startswith("/"):
        raise errors.UnsafeArchive(
            member.name, f"its target {member.linkname!r} is an absolute path"
        )


def _check_trailer(tar_path: Path, end: int) -> None:
    """tarfile stops silently at a corrupt header past the first: only zeros may follow."""
    with tar_path.open("rb") as f:
        f.seek(end)
        while chunk := f.read(1 << 20):
            if chunk.count(0) != len(chunk):
                raise errors.BadRequest(
                    f"the tar archive could not be read: unexpected data at offset {end} "
                    "(a corrupt header, or a second archive)"
                )


# --- extraction ---------------------------------------------------------------


@contextmanager
def _writing() -> Iterator[None]:
    try:
        yield
    except tarfile.FilterError as exc:  # validation should have caught it: never trust one check
        raise errors.UnsafeArchive(exc.tarinfo.name, str(exc)) from exc
    except OSError as exc:
        raise errors.ExecutorError(f"the archive could not be extracted: {exc}") from exc


def _populate(
    dest: Path,
    uid: int | None,
    gid: int | None,
    archive: tarfile.TarFile | None = None,
    members: Sequence[tarfile.TarInfo] = (),
) -> None:
    with _writing():
        dest.mkdir(parents=True, exist_ok=True)
        if archive is not None:
            archive.extractall(dest, members=members, filter=_sanitise)
        _settle(dest, uid, gid)


def _sanitise(member: tarfile.TarInfo, dest: str) -> tarfile.TarInfo:
    safe = tarfile.data_filter(member, dest)  # mode <= 0o755, no owners, links re-checked
    mode = 0o755 if safe.isdir() else safe.mode
    mtime = safe.mtime if 0 <= safe.mtime < _MAX_MTIME else 0
    return safe.replace(mode=mode, mtime=mtime, deep=False)


def _settle(dest: Path, uid: int | None, gid: int | None) -> None:
    """Parent dirs without an entry got the umask's mode: every dir gets 0o755; then owners."""
    owner = (-1 if uid is None else uid, -1 if gid is None else gid)
    chown = owner != (-1, -1)
    if chown:
        os.lchown(dest, *owner)
    pending = [str(dest)]
    while pending:
        with os.scandir(pending.pop()) as entries:
            for entry in entries:
                if chown:
                    os.lchown(entry.path, *owner)
                if entry.is_dir(follow_symlinks=False):
                    os.chmod(entry.path, 0o755)
                    pending.append(entry.path)
