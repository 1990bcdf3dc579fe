"""Request bodies: a small 10-file project, and a streamed multipart body around a big
synthetic tar whose length is known up front (so it is sent with Content-Length, not
chunked, and never held in memory).

Usage::

    files = {"tar": ("project.tar", ten_file_tar(), "application/x-tar"), ...}
    body = StreamedUpload(tar_size=100 * MB, metadata={"entrypoint": "main.py"})
    client.post(url, content=body.chunks(), headers=body.headers)
"""

from __future__ import annotations

import io
import json
import os
import tarfile
import uuid
from collections.abc import Iterator
from typing import Any

MB = 1000 * 1000
MiB = 1024 * 1024
BLOCK = 512
CHUNK = MiB

TEN_FILE_MAIN = (
    "import os, sys\nsys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))\n"
    + "".join(f"import mod{i}\n" for i in range(7))
    + "from data import load\nprint(sum(m.VALUE for m in "
    + "["
    + ", ".join(f"mod{i}" for i in range(7))
    + "]), load())\n"
)


def ten_file_project() -> dict[str, str]:
    """main.py, seven small modules, a data reader and its data: ten files; prints ``21 3``."""
    files = {"main.py": TEN_FILE_MAIN}
    for i in range(7):
        files[f"mod{i}.py"] = f"VALUE = {i}\n\n\ndef f(x):\n    return x * {i}\n"
    files["data.py"] = (
        "import os\n\n\ndef load():\n"
        "    path = os.path.join(os.path.dirname(__file__), 'data.txt')\n"
        "    return len(open(path).read().split())\n"
    )
    files["data.txt"] = "alpha beta gamma\n"
    return files


def tar_bytes(files: dict[str, str]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, text in files.items():
            data = text.encode()
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(data), 0o644
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def multipart_files(tar: bytes, metadata: dict[str, Any]) -> dict[str, Any]:
    return {
        "tar": ("project.tar", tar, "application/x-tar"),
        "metadata": (None, json.dumps(metadata), "application/json"),
    }


TEN_FILE_OUTPUT = "21 3\n"
BIG_MAIN = "import os\nprint(os.path.getsize('data.bin'))\n"


class StreamedUpload:
    """``metadata`` then ``tar``: main.py and data.bin, the tar ``tar_size`` bytes long
    (rounded down to tar's 512-byte blocks), generated on the fly."""

    def __init__(self, tar_size: int, metadata: dict[str, Any]) -> None:
        main = _member(BIG_MAIN.encode(), "main.py")
        self.data_size = (tar_size - len(main) - 3 * BLOCK) // BLOCK * BLOCK
        if self.data_size <= 0:
            raise ValueError(f"a tar of {tar_size} bytes has no room for data")
        self.tar_size = len(main) + BLOCK + self.data_size + 2 * BLOCK
        self.boundary = uuid.uuid4().hex
        self._block = os.urandom(CHUNK)  # random, so nothing on the way can compress it
        self._head = self._part_heads(metadata) + main + _header("data.bin", self.data_size)
        self._tail = b"\0" * (2 * BLOCK) + f"\r\n--{self.boundary}--\r\n".encode()

    @property
    def length(self) -> int:
        return len(self._head) + self.data_size + len(self._tail)

    @property
    def headers(self) -> dict[str, str]:
        return {
            "content-type": f"multipart/form-data; boundary={self.boundary}",
            "content-length": str(self.length),
        }

    def chunks(self) -> Iterator[bytes]:
        yield self._head
        left = self.data_size
        while left > 0:
            piece = self._block if left >= CHUNK else self._block[:left]
            left -= len(piece)
            yield piece
        yield self._tail

    def _part_heads(self, metadata: dict[str, Any]) -> bytes:
        b = self.boundary
        meta = (
            f'--{b}\r\nContent-Disposition: form-data; name="metadata"\r\n'
            f"Content-Type: application/json\r\n\r\n{json.dumps(metadata)}\r\n"
        )
        tar = (
            f'--{b}\r\nContent-Disposition: form-data; name="tar"; filename="big.tar"\r\n'
            "Content-Type: application/x-tar\r\n\r\n"
        )
        return (meta + tar).encode()


def _header(name: str, size: int) -> bytes:
    info = tarfile.TarInfo(name)
    info.size, info.mode = size, 0o644
    return info.tobuf(format=tarfile.USTAR_FORMAT)


def _member(data: bytes, name: str) -> bytes:
    return _header(name, len(data)) + data + b"\0" * _pad(len(data))


def _pad(size: int) -> int:
    return -size % BLOCK
