"""Safe tar extraction: archives are built here with tarfile, extracted for real on disk."""

from __future__ import annotations

import bz2
import gzip
import io
import lzma
import os
import stat
import subprocess
import tarfile
import zipfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Literal

import pytest
from python_executor_server import errors
from python_executor_server.upload import detect_entrypoint, extract_tar, sniff_compression
from python_executor_server.upload.chunks import LOOKBEHIND, ChunkReader
from python_executor_server.upload.tarsafe import extract_chunks

Entry = tuple[tarfile.TarInfo, bytes | None]


def file(name: str, data: bytes = b"", mode: int = 0o644) -> Entry:
    info = tarfile.TarInfo(name)
    info.size, info.mode = len(data), mode
    return info, data


def directory(name: str, mode: int = 0o755) -> Entry:
    info = tarfile.TarInfo(name)
    info.type, info.mode = tarfile.DIRTYPE, mode
    return info, None


def link(name: str, target: str, kind: bytes = tarfile.SYMTYPE) -> Entry:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, target
    return info, None


def special(name: str, kind: bytes) -> Entry:
    info = tarfile.TarInfo(name)
    info.type, info.devmajor, info.devminor = kind, 1, 3
    return info, None


def tar_bytes(entries: Iterable[Entry], fmt: int = tarfile.PAX_FORMAT) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as archive:
        for info, data in entries:
            archive.addfile(info, io.BytesIO(data) if data is not None else None)
    return buf.getvalue()


def write_tar(tmp_path: Path, entries: Iterable[Entry], fmt: int = tarfile.PAX_FORMAT) -> Path:
    path = tmp_path / "upload.tar"
    path.write_bytes(tar_bytes(entries, fmt))
    return path


def extract(tmp_path: Path, entries: Iterable[Entry], max_entries: int = 1000) -> Path:
    dest = tmp_path / "project"
    extract_tar(write_tar(tmp_path, entries), dest, max_entries=max_entries)
    return dest


def assert_nothing_written(dest: Path) -> None:
    assert not dest.exists() or not any(dest.iterdir())


GOOD = [file("main.py", b"print('hi')\n"), directory("pkg"), file("pkg/__init__.py")]


# --- rejections: every one names the entry and writes nothing ---------------------------

REJECTED: dict[str, tuple[list[Entry], str, str]] = {
    "absolute path": ([file("/etc/evil.py")], "/etc/evil.py", "absolute"),
    "dotdot": ([file("../evil.py")], "../evil.py", "'..'"),
    "dotdot in the middle": ([file("a/../../evil.py")], "a/../../evil.py", "'..'"),
    "dotdot staying inside": ([file("a/../b.py")], "a/../b.py", "'..'"),
    "symlink to absolute": ([link("passwd", "/etc/passwd")], "passwd", "absolute"),
    "symlink to root dir": ([link("root", "/")], "root", "absolute"),
    "symlink leaving root": ([link("up", "../outside")], "up", "outside"),
    "symlink leaving deep": (
        [directory("a"), directory("a/b"), link("a/b/up", "../../..")],
        "a/b/up",
        "outside",
    ),
    # lexically inside ("a/b/l1/../../.." is "."), but l1 is the root, so the kernel goes above it
    "symlink through symlink": (
        [directory("a/b"), link("a/b/l1", "../.."), link("a/b/l2", "l1/../../..")],
        "a/b/l2",
        "outside",
    ),
    # the target only escapes once a later entry makes "a/x" a symlink
    "symlink made unsafe later": (
        [directory("a"), link("a/l2", "x/../.."), link("a/x", "..")],
        "a/l2",
        "outside",
    ),
    "symlink loop": ([link("a", "b"), link("b", "a")], "a", "loop"),
    "symlink empty target": ([link("empty", "")], "empty", "empty target"),
    "hard link inside": ([file("main.py"), link("h", "main.py", tarfile.LNKTYPE)], "h", "hard"),
    "hard link to host file": ([link("shadow", "/etc/shadow", tarfile.LNKTYPE)], "shadow", "hard"),
    "char device": ([special("null", tarfile.CHRTYPE)], "null", "device"),
    "block device": ([special("sda", tarfile.BLKTYPE)], "sda", "device"),
    "fifo": ([special("pipe", tarfile.FIFOTYPE)], "pipe", "FIFO"),
    "unknown type": ([special("vol", b"V")], "vol", "type"),
    # Judge0 2024: a symlinked directory, then a file written through it
    "file through symlinked dir": (
        [directory("d"), link("evil", "d"), file("evil/x.py", b"boom")],
        "evil/x.py",
        "passes through the symlink 'evil'",
    ),
    "dir through symlinked dir": (
        [link("evil", "."), directory("evil/sub")],
        "evil/sub",
        "passes through the symlink",
    ),
    "file replacing a symlink": (
        [file("target.py"), link("s", "target.py"), file("s", b"overwrite")],
        "s",
        "replace an earlier symlink",
    ),
    "symlink replacing a file": (
        [file("s.py"), link("s.py", "main.py")],
        "s.py",
        "replace an earlier file",
    ),
    "symlink replacing a dir": (
        [file("d/x.py"), link("d", ".")],
        "d",
        "replace an earlier dir",
    ),
    "file under a file": ([file("a"), file("a/b.py")], "a/b.py", "is a file"),
    "root replaced by a file": ([file("./")], "./", "root"),
}


@pytest.mark.parametrize("case", REJECTED, ids=list(REJECTED))
def test_unsafe_entries_are_rejected_before_anything_is_written(tmp_path: Path, case: str) -> None:
    entries, entry, reason = REJECTED[case]
    dest = tmp_path / "project"
    # good files first: they must not be written either, validation comes before extraction
    path = write_tar(tmp_path, [*GOOD, *entries])
    with pytest.raises(errors.UnsafeArchive) as caught:
        extract_tar(path, dest, max_entries=1000)
    assert caught.value.status_code == 400
    assert caught.value.entry == entry
    assert repr(entry) in caught.value.message
    assert reason in caught.value.message
    assert_nothing_written(dest)


def test_sparse_files_are_rejected(tmp_path: Path) -> None:
    info = tarfile.TarInfo("holes.bin")
    info.type = tarfile.GNUTYPE_SPARSE
    path = write_tar(tmp_path, [*GOOD, (info, None)], fmt=tarfile.GNU_FORMAT)
    with pytest.raises(errors.UnsafeArchive, match="sparse"):
        extract_tar(path, tmp_path / "project", max_entries=10)
    assert_nothing_written(tmp_path / "project")


def test_a_bad_entry_after_thousands_of_good_ones_writes_nothing(tmp_path: Path) -> None:
    entries = [file(f"f{i}.py", b"x") for i in range(3000)]
    path = write_tar(tmp_path, [*entries, link("last", "/etc")])
    with pytest.raises(errors.UnsafeArchive):
        extract_tar(path, tmp_path / "project", max_entries=10_000)
    assert_nothing_written(tmp_path / "project")


def test_too_many_entries(tmp_path: Path) -> None:
    path = write_tar(tmp_path, [file(f"f{i}.py") for i in range(11)])
    with pytest.raises(errors.BadRequest, match="more than 10 entries") as caught:
        extract_tar(path, tmp_path / "project", max_entries=10)
    assert type(caught.value) is errors.BadRequest
    assert_nothing_written(tmp_path / "project")


def test_exactly_max_entries_is_fine(tmp_path: Path) -> None:
    path = write_tar(tmp_path, [file(f"f{i}.py") for i in range(10)])
    assert len(extract_tar(path, tmp_path / "project", max_entries=10).files) == 10


def test_parent_directories_count_as_entries(tmp_path: Path) -> None:
    path = write_tar(tmp_path, [file("a/b/c/d/e.py")])  # five inodes from one entry
    with pytest.raises(errors.BadRequest, match="more than 4 entries"):
        extract_tar(path, tmp_path / "project", max_entries=4)
    assert_nothing_written(tmp_path / "project")
    assert extract_tar(path, tmp_path / "p2", max_entries=5).files == ("a/b/c/d/e.py",)


def test_deep_paths_and_long_symlink_chains(tmp_path: Path) -> None:
    deep = "/".join(["d"] * 127)
    chain = [link(f"l{i}", f"l{i + 1}") for i in range(30)] + [link("l30", deep)]
    path = write_tar(tmp_path, [file(f"{deep}/x.py", b"deep"), *chain])
    project = extract_tar(path, tmp_path / "project", max_entries=2000)
    assert (project.root / "l0" / "x.py").read_bytes() == b"deep"
    too_long = [link(f"m{i}", f"m{i + 1}") for i in range(60)] + [directory("m60")]
    path = write_tar(tmp_path, too_long)
    with pytest.raises(errors.UnsafeArchive, match="chain of more than 40"):
        extract_tar(path, tmp_path / "p2", max_entries=100)


def test_many_global_pax_records_are_refused(tmp_path: Path) -> None:
    buf = io.BytesIO()
    records = {f"k{i}": "v" for i in range(100)}
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT, pax_headers=records) as tf:
        tf.addfile(file("main.py")[0], io.BytesIO())
    path = tmp_path / "upload.tar"
    path.write_bytes(buf.getvalue())
    with pytest.raises(errors.BadRequest, match="more than 64 global pax records"):
        extract_tar(path, tmp_path / "project", max_entries=10)


def test_git_archive_style_global_header_is_fine(tmp_path: Path) -> None:
    buf = io.BytesIO()
    comment = {"comment": "3f4e1c2b9a8d7e6f5a4b3c2d1e0f9a8b7c6d5e4f"}
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT, pax_headers=comment) as tf:
        tf.addfile(file("main.py", b"print(1)")[0], io.BytesIO(b"print(1)"))
    path = tmp_path / "upload.tar"
    path.write_bytes(buf.getvalue())
    assert extract_tar(path, tmp_path / "project", max_entries=10).files == ("main.py",)


def test_pax_sparse_files_are_refused_before_their_map_is_read(tmp_path: Path) -> None:
    info, data = file("holes.bin", b"x" * 512)
    info.pax_headers = {"GNU.sparse.major": "1", "GNU.sparse.minor": "0", "GNU.sparse.name": "h"}
    path = write_tar(tmp_path, [*GOOD, (info, data)])
    with pytest.raises(errors.BadRequest, match="sparse"):
        extract_tar(path, tmp_path / "project", max_entries=10)
    assert_nothing_written(tmp_path / "project")


def test_oversized_pax_header_is_refused_without_reading_it(tmp_path: Path) -> None:
    info, data = file("main.py", b"x")
    info.pax_headers = {"comment": "x" * (2 << 20)}
    path = write_tar(tmp_path, [(info, data)])
    with pytest.raises(errors.BadRequest, match="extended header"):
        extract_tar(path, tmp_path / "project", max_entries=10)
    assert_nothing_written(tmp_path / "project")


# --- bodies that are not a readable tar -----------------------------------------------


def _zip_bytes() -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("main.py", "print(1)")
    return buf.getvalue()


COMPRESSED: dict[str, Callable[[bytes], bytes]] = {
    "gzip": gzip.compress,
    "bzip2": bz2.compress,
    "xz": lzma.compress,
    "zip": lambda raw: _zip_bytes(),
    "zstd": lambda raw: b"\x28\xb5\x2f\xfd" + raw,  # a zstd frame header: the magic is what counts
}


@pytest.mark.parametrize("kind", COMPRESSED)
def test_compressed_archives_are_refused(tmp_path: Path, kind: str) -> None:
    path = tmp_path / "upload.tar"
    path.write_bytes(COMPRESSED[kind](tar_bytes(GOOD)))
    with pytest.raises(errors.UnsupportedArchive) as caught:
        extract_tar(path, tmp_path / "project", max_entries=10)
    assert caught.value.message == f"only uncompressed tar archives are accepted (got {kind})"
    assert_nothing_written(tmp_path / "project")


@pytest.mark.parametrize(("mode", "kind"), [("w:gz", "gzip"), ("w:bz2", "bzip2"), ("w:xz", "xz")])
def test_sniffing_names_tarfile_compressed_output(
    mode: Literal["w:gz", "w:bz2", "w:xz"], kind: str
) -> None:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode=mode) as archive:
        archive.addfile(file("main.py", b"x")[0], io.BytesIO(b"x"))
    assert sniff_compression(buf.getvalue()[:512]) == kind
    assert sniff_compression(tar_bytes(GOOD)[:512]) is None


def test_a_tar_whose_first_name_looks_like_a_magic_number_is_still_tar(tmp_path: Path) -> None:
    raw = tar_bytes([file("BZh91AY&SY.py", b"print(1)\n"), file("PK\x03\x04.py")])
    assert raw.startswith(b"BZh")
    assert sniff_compression(raw[:512]) is None
    path = tmp_path / "upload.tar"
    path.write_bytes(raw)
    project = extract_tar(path, tmp_path / "project", max_entries=10)
    assert project.files == ("BZh91AY&SY.py", "PK\x03\x04.py")


@pytest.mark.parametrize(
    "body",
    [b"hello, this is not a tar", os.urandom(4096), b"\x00" * 100],
    ids=["text", "random", "short-zeros"],
)
def test_non_tar_bodies_are_a_bad_request(tmp_path: Path, body: bytes) -> None:
    path = tmp_path / "upload.tar"
    path.write_bytes(body)
    with pytest.raises(errors.BadRequest, match="the tar archive could not be read"):
        extract_tar(path, tmp_path / "project", max_entries=10)
    assert_nothing_written(tmp_path / "project")


def test_truncated_archive_is_a_bad_request(tmp_path: Path) -> None:
    raw = tar_bytes([file("main.py", b"x" * 5000), file("other.py", b"y" * 5000)])
    path = tmp_path / "upload.tar"
    path.write_bytes(raw[:2000])  # inside main.py's data
    with pytest.raises(errors.BadRequest, match="could not be read"):
        extract_tar(path, tmp_path / "project", max_entries=10)
    assert_nothing_written(tmp_path / "project")


def test_corrupt_header_after_the_first_member_is_not_silently_ignored(tmp_path: Path) -> None:
    raw = bytearray(tar_bytes([file("main.py", b"x" * 10), file("evil.py", b"y" * 10)]))
    second = 1024  # main.py: one header block + one data block
    assert raw[second : second + 7] == b"evil.py"
    raw[second + 148 : second + 156] = b"0000000\0"  # a wrong checksum
    path = tmp_path / "upload.tar"
    path.write_bytes(bytes(raw))
    with pytest.raises(errors.BadRequest, match="unexpected data at offset 1024"):
        extract_tar(path, tmp_path / "project", max_entries=10)
    assert_nothing_written(tmp_path / "project")


# --- what is allowed ------------------------------------------------------------------


def test_nested_packages(tmp_path: Path) -> None:
    dest = extract(
        tmp_path,
        [
            file("main.py", b"import pkg.sub.mod\n"),
            directory("pkg"),
            file("pkg/__init__.py"),
            file("pkg/sub/__init__.py"),  # parent directory without an entry of its own
            file("pkg/sub/mod.py", b"VALUE = 42\n"),
            file("data/config.json", b"{}"),
        ],
    )
    assert (dest / "pkg/sub/mod.py").read_bytes() == b"VALUE = 42\n"
    assert (dest / "data/config.json").read_bytes() == b"{}"
    assert sorted(p.relative_to(dest).as_posix() for p in dest.rglob("*") if p.is_file()) == [
        "data/config.json",
        "main.py",
        "pkg/__init__.py",
        "pkg/sub/__init__.py",
        "pkg/sub/mod.py",
    ]


def test_files_are_listed_in_archive_order(tmp_path: Path) -> None:
    path = write_tar(
        tmp_path,
        [directory("z"), file("z/b.py"), file("a.txt"), link("l", "a.txt"), file("c.py")],
    )
    project = extract_tar(path, tmp_path / "project", max_entries=10)
    assert project.root == tmp_path / "project"
    assert project.files == ("z/b.py", "a.txt", "c.py")  # regular files only


def test_dot_slash_archives_from_tar_c(tmp_path: Path) -> None:
    dest = extract(
        tmp_path,
        [directory("."), file("./main.py", b"1"), directory("./pkg"), file("./pkg/m.py")],
    )
    assert (dest / "main.py").read_bytes() == b"1"
    path = write_tar(tmp_path, [directory("./"), file("./main.py"), file("./pkg//m.py")])
    assert extract_tar(path, tmp_path / "p2", max_entries=10).files == ("main.py", "pkg/m.py")


def test_duplicate_files_keep_the_last_content_and_are_listed_once(tmp_path: Path) -> None:
    path = write_tar(tmp_path, [file("main.py", b"old"), file("x.py"), file("main.py", b"new")])
    project = extract_tar(path, tmp_path / "project", max_entries=10)
    assert project.files == ("main.py", "x.py")
    assert (project.root / "main.py").read_bytes() == b"new"


def test_symlinks_inside_the_root_are_allowed(tmp_path: Path) -> None:
    dest = extract(
        tmp_path,
        [
            file("data/values.txt", b"42"),
            link("values.txt", "data/values.txt"),
            directory("pkg"),
            link("pkg/data", "../data"),
            link("here", "."),
            link("chain", "pkg/data/values.txt"),  # through another in-root symlink
        ],
    )
    assert os.readlink(dest / "values.txt") == "data/values.txt"
    assert (dest / "values.txt").read_bytes() == b"42"
    assert (dest / "pkg/data/values.txt").read_bytes() == b"42"
    assert (dest / "chain").read_bytes() == b"42"
    assert (dest / "here").is_symlink()


@pytest.mark.parametrize("fmt", [tarfile.PAX_FORMAT, tarfile.GNU_FORMAT], ids=["pax", "gnu"])
def test_long_names_and_long_link_targets(tmp_path: Path, fmt: int) -> None:
    deep = "/".join([f"a_rather_long_directory_name_{i:02d}" for i in range(6)])
    name = f"{deep}/{'m' * 120}.py"
    target = "/".join([".."] * 6) + "/main.py"
    assert len(name) > 100 and len(f"{deep}/{target}") > 100
    path = write_tar(
        tmp_path, [file("main.py", b"top"), file(name, b"deep"), link(f"{deep}/ln", target)], fmt
    )
    project = extract_tar(path, tmp_path / "project", max_entries=10)
    assert project.files == ("main.py", name)
    assert (project.root / name).read_bytes() == b"deep"
    assert (project.root / deep / "ln").read_bytes() == b"top"


def test_unicode_names(tmp_path: Path) -> None:
    dest = extract(tmp_path, [file("données/été.py", b"x"), file("日本.py")])
    assert (dest / "données/été.py").read_bytes() == b"x"


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("x" * 300 + ".py", "too long"),
        ("/".join(["abcdefghij"] * 400) + ".py", "too long"),
        ("d/" * 128 + "x.py", "more than 128 levels deep"),
    ],
    ids=["component", "path", "depth"],
)
def test_too_long_or_too_deep_paths_are_rejected(tmp_path: Path, name: str, reason: str) -> None:
    path = write_tar(tmp_path, [file(name)])
    with pytest.raises(errors.UnsafeArchive, match=reason):
        extract_tar(path, tmp_path / "project", max_entries=1000)


def test_empty_archive(tmp_path: Path) -> None:
    project = extract_tar(write_tar(tmp_path, []), tmp_path / "project", max_entries=10)
    assert project.files == ()
    assert project.root.is_dir() and not any(project.root.iterdir())


def test_zero_byte_file_is_an_empty_archive(tmp_path: Path) -> None:
    path = tmp_path / "upload.tar"
    path.write_bytes(b"")
    assert extract_tar(path, tmp_path / "project", max_entries=10).files == ()


def test_thousands_of_files(tmp_path: Path) -> None:
    entries = [file(f"pkg{i % 50}/mod{i}.py", f"N = {i}\n".encode()) for i in range(5000)]
    project = extract_tar(write_tar(tmp_path, entries), tmp_path / "project", max_entries=100_000)
    assert len(project.files) == 5000
    assert project.files[0] == "pkg0/mod0.py"
    assert (project.root / "pkg49/mod4999.py").read_text() == "N = 4999\n"
    assert sum(1 for p in project.root.rglob("*.py")) == 5000


def test_permissions_are_sanitised(tmp_path: Path) -> None:
    dest = extract(
        tmp_path,
        [
            directory("open", 0o777),
            file("open/setuid.py", b"x", 0o4777),
            file("setgid.py", b"x", 0o2755),
            file("world.py", b"x", 0o666),
            file("secret.py", b"x", 0o000),
        ],
    )

    def mode(rel: str) -> int:
        return stat.S_IMODE((dest / rel).stat().st_mode)

    assert mode("open") == 0o755
    assert mode("open/setuid.py") == 0o755
    assert mode("setgid.py") == 0o755
    assert mode("world.py") == 0o644
    assert mode("secret.py") == 0o600  # the owner can always read and write
    for p in dest.rglob("*"):
        assert not p.stat().st_mode & (stat.S_ISUID | stat.S_ISGID | stat.S_ISVTX | 0o022)


def test_parent_dirs_without_entries_get_0o755_whatever_the_umask(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        dest = extract(tmp_path, [file("implicit/deeper/m.py", b"x"), directory("explicit", 0o777)])
    finally:
        os.umask(old)
    for rel in ("implicit", "implicit/deeper", "explicit"):
        assert stat.S_IMODE((dest / rel).stat().st_mode) == 0o755, rel


def test_second_archive_after_the_end_marker_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "upload.tar"
    path.write_bytes(tar_bytes([file("main.py")]) + tar_bytes([file("hidden.py")]))
    with pytest.raises(errors.BadRequest, match="a second archive"):
        extract_tar(path, tmp_path / "project", max_entries=10)


@pytest.fixture()
def tiny_fs(tmp_path: Path) -> Iterator[Path]:
    """A 1 MiB tmpfs: a full disk, for real."""
    mnt = tmp_path / "tiny"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], check=True)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=True)


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tmpfs needs root (CI is root)")
def test_disk_full_midway_is_a_server_error(tmp_path: Path, tiny_fs: Path) -> None:
    path = write_tar(
        tmp_path, [file("a.bin", os.urandom(600_000)), file("b.bin", os.urandom(600_000))]
    )
    with pytest.raises(errors.ExecutorError, match="could not be extracted") as caught:
        extract_tar(path, tiny_fs / "project", max_entries=10)
    assert caught.value.status_code == 500
    # the disk filled while the data was still arriving: its incoming dir is gone, and the
    # project dir was never made
    assert list(tiny_fs.iterdir()) == []


def test_absurd_mtimes_do_not_break_extraction(tmp_path: Path) -> None:
    info, data = file("main.py", b"x")
    info.pax_headers = {"mtime": "1e30"}
    far_future = extract(tmp_path, [(info, data)])
    assert (far_future / "main.py").read_bytes() == b"x"


def test_owner_in_the_archive_is_ignored(tmp_path: Path) -> None:
    info, data = file("main.py", b"x")
    info.uid, info.gid, info.uname, info.gname = 0, 0, "root", "root"
    dest = extract(tmp_path, [(info, data)])
    st = (dest / "main.py").stat()
    assert (st.st_uid, st.st_gid) == (os.geteuid(), os.getegid())


@pytest.mark.skipif(os.geteuid() != 0, reason="chown to another user needs root (CI is root)")
def test_chown_to_the_sandbox_user(tmp_path: Path) -> None:
    path = write_tar(
        tmp_path, [file("main.py", b"x"), file("pkg/m.py"), link("ln", "main.py"), directory("e")]
    )
    project = extract_tar(path, tmp_path / "project", max_entries=10, uid=1000, gid=1000)
    for p in [project.root, *project.root.rglob("*")]:
        st = p.lstat()
        assert (st.st_uid, st.st_gid) == (1000, 1000), p


def test_validation_runs_before_the_dest_is_created(tmp_path: Path) -> None:
    path = write_tar(tmp_path, [*GOOD, file("../x")])
    with pytest.raises(errors.UnsafeArchive):
        extract_tar(path, tmp_path / "project", max_entries=10)
    assert not (tmp_path / "project").exists()
    assert not (tmp_path / "x").exists()


# --- entrypoint -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("files", "expected"),
    [
        (["a.py", "__main__.py", "main.py"], "main.py"),
        (["a.py", "__main__.py"], "__main__.py"),
        (["pkg/main.py", "pkg/__main__.py", "z.py", "a.py"], "pkg/main.py"),
        (["README.md", "lib/z.py", "a.py"], "lib/z.py"),
        (["README.md", "data.json"], None),
        ([], None),
    ],
)
def test_detect_entrypoint(files: list[str], expected: str | None) -> None:
    assert detect_entrypoint(files) == expected


# --- an archive read as it arrives ---------------------------------------------------------


def _mixed_archive() -> bytes:
    sizes = [0, 1, 511, 512, 513, 70_000]
    return tar_bytes(
        [
            directory("pkg"),
            *(file(f"pkg/f{size}.bin", os.urandom(size)) for size in sizes),
            file("deep/" + "d" * 120 + "/" + "n" * 150 + ".py", b"long name\n"),
            link("pkg/alias", "f513.bin"),
            file("main.py", b"print(1)\n", mode=0o700),
        ]
    )


def _tree(root: Path) -> dict[str, tuple[int, bytes | str]]:
    found: dict[str, tuple[int, bytes | str]] = {}
    for p in sorted(root.rglob("*")):
        st = p.lstat()
        content: bytes | str = (
            os.readlink(p) if p.is_symlink() else p.read_bytes() if p.is_file() else ""
        )
        found[p.relative_to(root).as_posix()] = (stat.S_IMODE(st.st_mode), content)
    return found


@pytest.mark.parametrize("chunk", [1, 7, 511, 512, 513, 4096, 1 << 20])
def test_any_chunking_extracts_the_same_tree(tmp_path: Path, chunk: int) -> None:
    data = _mixed_archive()
    pieces = iter([data[i : i + chunk] for i in range(0, len(data), chunk)])
    project = extract_chunks(lambda: next(pieces, None), tmp_path / "project", max_entries=100)
    reference = tmp_path / "reference"
    reference.mkdir()
    (reference / "upload.tar").write_bytes(data)
    want = extract_tar(reference / "upload.tar", reference / "project", max_entries=100)
    assert project.files == want.files
    assert _tree(project.root) == _tree(want.root)
    assert (project.root / "pkg/f513.bin").read_bytes() == (want.root / "pkg/f513.bin").read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["project", "reference"]  # no leftovers


def test_a_refused_stream_leaves_nothing(tmp_path: Path) -> None:
    data = tar_bytes([*(file(f"f{i}.bin", os.urandom(5000)) for i in range(50)), file("../x")])
    pieces = iter([data[i : i + 4096] for i in range(0, len(data), 4096)])
    with pytest.raises(errors.UnsafeArchive):
        extract_chunks(lambda: next(pieces, None), tmp_path / "project", max_entries=100)
    assert list(tmp_path.iterdir()) == []


def test_a_stream_that_stops_inside_a_file_is_a_bad_request(tmp_path: Path) -> None:
    data = tar_bytes([file("main.py", b"x"), file("big.bin", os.urandom(100_000))])
    cut = iter([data[:20_000]])
    with pytest.raises(errors.BadRequest, match=r"ends inside 'big\.bin'"):
        extract_chunks(lambda: next(cut, None), tmp_path / "project", max_entries=10)
    assert list(tmp_path.iterdir()) == []


def test_chunk_reader_keeps_only_a_little_behind() -> None:
    pieces = iter([b"a" * 10_000, b"b" * 10_000, b"c" * 10_000])
    reader = ChunkReader(lambda: next(pieces, None))
    assert reader.read(15_000) == b"a" * 10_000 + b"b" * 5_000
    reader.seek(15_000 - LOOKBEHIND)  # a seek back within the last few KiB works
    assert reader.read(LOOKBEHIND + 1) == b"b" * LOOKBEHIND + b"b"
    with pytest.raises(OSError, match="cannot seek back"):
        reader.seek(0)
    reader.seek(25_000)  # forward: skipped
    assert reader.read(10_000) == b"c" * 5_000
    assert reader.read(1) == b""
