"""The tar streams the client builds: valid archives, exact sizes, bounded memory."""

from __future__ import annotations

import io
import os
import tarfile
import tracemalloc
from pathlib import Path

import pytest
from python_executor_client import InvalidInput, detect_entrypoint
from python_executor_client._packing import Upload, pack, pack_path, pack_paths, pack_tar


def _read(upload: Upload) -> tarfile.TarFile:
    data = b"".join(upload.chunks())
    assert len(data) == upload.size
    return tarfile.open(fileobj=io.BytesIO(data), mode="r:")


def _contents(upload: Upload) -> dict[str, bytes]:
    with _read(upload) as tar:
        return {
            member.name: tar.extractfile(member).read()  # type: ignore[union-attr]
            for member in tar.getmembers()
            if member.isfile()
        }


def test_dict_becomes_an_uncompressed_tar_with_exact_size() -> None:
    upload = pack({"main.py": "print('hé')", "./pkg/util.py": b"X = 1\n"})
    assert _contents(upload) == {"main.py": "print('hé')".encode(), "pkg/util.py": b"X = 1\n"}
    assert upload.entrypoint == "main.py"
    assert upload.size % tarfile.RECORDSIZE == 0


def test_directory_keeps_relative_paths_modes_and_empty_dirs(tmp_path: Path) -> None:
    (tmp_path / "pkg" / "empty").mkdir(parents=True)
    (tmp_path / "pkg" / "mod.py").write_text("Y = 2\n")
    (tmp_path / "run.sh").write_text("#!/bin/sh\n")
    (tmp_path / "run.sh").chmod(0o755)
    (tmp_path / "zz.py").write_text("print(1)\n")
    (tmp_path / "link.py").symlink_to(tmp_path / "zz.py")
    upload = pack_path(tmp_path)
    with _read(upload) as tar:
        members = {m.name: m for m in tar.getmembers()}
    assert members["pkg/empty"].isdir()
    assert members["run.sh"].mode == 0o755
    assert members["link.py"].isfile()  # symlinks to files are followed
    assert upload.names[:3] == ("link.py", "run.sh", "zz.py")  # root files first, sorted
    assert upload.entrypoint == "link.py"


def test_entrypoint_rule_matches_the_server() -> None:
    assert detect_entrypoint(["a.py", "__main__.py", "main.py"]) == "main.py"
    assert detect_entrypoint(["a.py", "__main__.py"]) == "__main__.py"
    assert detect_entrypoint(["README", "pkg/b.py", "a.py"]) == "pkg/b.py"
    assert detect_entrypoint(["README"]) is None


def test_single_file_is_its_own_entrypoint_even_without_py(tmp_path: Path) -> None:
    script = tmp_path / "tool"
    script.write_text("print('x')\n")
    upload = pack_path(str(script))
    assert upload.names == ("tool",) and upload.entrypoint == "tool"


def test_paths_keep_relative_names_and_reject_duplicates(tmp_path: Path) -> None:
    (tmp_path / "lib").mkdir()
    (tmp_path / "lib" / "util.py").write_text("U = 1\n")
    (tmp_path / "main.py").write_text("import lib.util\n")
    outside = tmp_path.parent / f"{tmp_path.name}-outside.py"
    outside.write_text("O = 1\n")
    upload = pack_paths(["main.py", "lib/util.py", outside], base=tmp_path)
    assert set(_contents(upload)) == {"main.py", "lib/util.py", outside.name}
    with pytest.raises(InvalidInput, match="more than once"):
        pack_paths(["main.py", tmp_path / "main.py"], base=tmp_path)
    outside.unlink()


def test_existing_tar_is_sent_unchanged(tmp_path: Path) -> None:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        info = tarfile.TarInfo("main.py")
        info.size = 9
        tar.addfile(info, io.BytesIO(b"print(1)\n"))
    (tmp_path / "code.tar").write_bytes(buffer.getvalue())
    assert b"".join(pack_tar(buffer.getvalue()).chunks()) == buffer.getvalue()
    from_disk = pack_tar(tmp_path / "code.tar")
    assert from_disk.blocking and b"".join(from_disk.chunks()) == buffer.getvalue()


def test_missing_input_is_invalid_input(tmp_path: Path) -> None:
    with pytest.raises(InvalidInput):
        pack()
    with pytest.raises(InvalidInput, match="no such file"):
        pack(tmp_path / "nope")
    with pytest.raises(ValueError):  # InvalidInput is a ValueError, like the original's
        pack({})


def test_a_file_that_shrinks_after_planning_keeps_the_size_promised(tmp_path: Path) -> None:
    (tmp_path / "main.py").write_text("print('long enough')\n" * 100)
    upload = pack_path(tmp_path)
    (tmp_path / "main.py").write_text("x\n")
    assert len(b"".join(upload.chunks())) == upload.size


def test_large_directory_streams_in_bounded_memory(tmp_path: Path) -> None:
    big = tmp_path / "data.bin"
    with open(big, "wb") as file:
        file.truncate(64 * 1024 * 1024)  # sparse: 64 MiB without using the disk
    (tmp_path / "main.py").write_text("print(1)\n")
    upload = pack_path(tmp_path)
    tracemalloc.start()
    total = sum(len(chunk) for chunk in upload.chunks())
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert total == upload.size > 64 * 1024 * 1024
    assert peak < 2 * 1024 * 1024


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any file")
def test_unreadable_file_is_reported_before_upload(tmp_path: Path) -> None:
    secret = tmp_path / "secret.py"
    secret.write_text("x")
    secret.chmod(0)
    with pytest.raises(InvalidInput, match="permission denied"):
        pack_path(tmp_path)
