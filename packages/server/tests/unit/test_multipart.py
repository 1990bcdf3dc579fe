"""The streaming multipart reader, through a real uvicorn server on 127.0.0.1.

The server is a subprocess (so its memory can be measured) running the tiny
Starlette app ``create_test_app`` below, which calls ``receive_exec_upload``
and reports what it got. A few edge cases of chunking are driven through the
ASGI interface directly, where the chunk boundaries can be chosen exactly.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import json
import os
import shutil
import socket
import subprocess
import sys
import tarfile
import time
import uuid
import zipfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx2
import pytest
from python_executor_server import errors
from python_executor_server.upload import receive_exec_upload
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route
from starlette.types import Message

BOUNDARY = "pyexec-test-7f3a9c"
CONTENT_TYPE = f"multipart/form-data; boundary={BOUNDARY}"
MiB = 1 << 20


# --- the app the server runs (imported by uvicorn in the subprocess) -------------------


def create_test_app() -> Starlette:
    base = Path(os.environ["UPLOAD_TEST_DIR"])

    async def upload(request: Request) -> JSONResponse:
        dest = base / request.query_params["id"]
        dest.mkdir()
        try:
            got = await receive_exec_upload(
                request,
                dest,
                max_bytes=int(request.query_params.get("max_bytes", 1 << 40)),
                max_entries=1000,
                max_metadata_bytes=int(request.query_params.get("max_metadata", MiB)),
            )
        except errors.ExecutorError as exc:
            # "Connection: close": uvicorn then stops reading instead of draining the body
            content = {"error": exc.message, "kind": type(exc).__name__}
            return JSONResponse(content, exc.status_code, headers={"connection": "close"})
        project = {"root": str(got.project.root), "files": list(got.project.files)}
        return JSONResponse({"project": project, "metadata": got.metadata.decode()})

    return Starlette(routes=[Route("/upload", upload, methods=["POST"])])


# --- the server -------------------------------------------------------------------------


@dataclass
class Server:
    proc: subprocess.Popen[bytes]
    url: str
    base: Path

    def dir(self, request_id: str) -> Path:
        return self.base / request_id

    def status(self) -> dict[str, int]:
        """VmRSS / VmHWM of the server process, in KiB."""
        lines = Path(f"/proc/{self.proc.pid}/status").read_text().splitlines()
        fields = (line.split(":") for line in lines if line.startswith(("VmRSS", "VmHWM")))
        return {key: int(value.split()[0]) for key, value in fields}

    def reset_peak(self) -> None:
        Path(f"/proc/{self.proc.pid}/clear_refs").write_text("5")  # VmHWM := VmRSS


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    base = tmp_path_factory.mktemp("uploads")
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    # the server's own HTTP protocol (api/http_protocol.py), as `serve` runs it
    run = (
        "import sys, uvicorn\n"
        "from python_executor_server.api.http_protocol import HttpProtocol\n"
        "uvicorn.run('test_multipart:create_test_app', factory=True, fd=int(sys.argv[1]),"
        " app_dir=sys.argv[2], http=HttpProtocol, log_level='warning')\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", run, str(sock.fileno()), str(Path(__file__).parent)],
        pass_fds=[sock.fileno()],
        env={**os.environ, "UPLOAD_TEST_DIR": str(base)},
    )
    sock.close()
    try:
        _wait_ready(url, proc)
        yield Server(proc, url, base)
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def _wait_ready(url: str, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        assert proc.poll() is None, "the test server exited"
        try:
            httpx2.get(url + "/", timeout=1)
            return
        except httpx2.TransportError:
            time.sleep(0.05)
    raise TimeoutError("the test server did not start")


# --- building bodies ----------------------------------------------------------------------

Part = tuple[str, Iterable[bytes], str | None]  # name, content chunks, filename


def part_head(name: str, filename: str | None) -> bytes:
    disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
    ctype = "application/x-tar" if filename else "application/json"
    head = f"--{BOUNDARY}\r\nContent-Disposition: {disposition}\r\nContent-Type: {ctype}\r\n\r\n"
    return head.encode()


def body(*parts: Part, close: bool = True) -> Iterator[bytes]:
    for name, chunks, filename in parts:
        yield part_head(name, filename)
        yield from chunks
        yield b"\r\n"
    if close:
        yield f"--{BOUNDARY}--\r\n".encode()


def metadata(value: dict[str, Any] | None = None) -> Part:
    return ("metadata", [json.dumps(value or {"entrypoint": "main.py"}).encode()], None)


def tar_part(data: bytes, chunk: int = 64 * 1024) -> Part:
    return ("tar", (data[i : i + chunk] for i in range(0, len(data), chunk)), "project.tar")


def real_tar(extra: bytes = b"") -> bytes:
    """main.py, then blob.bin holding ``extra``."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as archive:
        for name, data in [("main.py", b"print('hi')\n"), ("blob.bin", extra)]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def tricky_payload(size: int) -> bytes:
    """Random bytes sprinkled with near-boundaries, CRLFs and dashes; never the delimiter
    itself (a client picks a boundary its data does not contain): a near one that the
    next random byte completes would end the part."""
    delimiter = f"\r\n--{BOUNDARY}".encode()
    near = [delimiter[:n] for n in range(1, len(delimiter))]
    while True:
        out, rnd = bytearray(), os.urandom(size)
        for i in range(0, size, 997):
            out += rnd[i : i + 997] + near[i % len(near)]
        if delimiter not in out:
            return bytes(out)


def post(
    server: Server,
    content: Iterable[bytes] | bytes,
    *,
    headers: dict[str, str] | None = None,
    **params: int,
) -> tuple[httpx2.Response, Path]:
    request_id = uuid.uuid4().hex
    with httpx2.Client(timeout=120) as client:
        response = client.post(
            f"{server.url}/upload",
            params={"id": request_id, **params},
            content=content,
            headers={"content-type": CONTENT_TYPE, **(headers or {})},
        )
    return response, server.dir(request_id)


def files_in(dest: Path) -> list[str]:
    return sorted(p.name for p in dest.rglob("*"))


# --- tests -----------------------------------------------------------------------------------


@pytest.mark.parametrize("order", ["metadata-first", "tar-first"])
def test_both_parts_in_either_order(server: Server, order: str) -> None:
    payload = tricky_payload(3 * MiB + 12345)
    parts = [metadata({"entrypoint": "main.py", "stdin": "x"}), tar_part(real_tar(payload), 7919)]
    if order == "tar-first":
        parts.reverse()
    response, dest = post(server, body(*parts))
    assert response.status_code == 200, response.text
    got = response.json()
    assert json.loads(got["metadata"]) == {"entrypoint": "main.py", "stdin": "x"}
    assert got["project"] == {"root": str(dest / "project"), "files": ["main.py", "blob.bin"]}
    blob = (dest / "project" / "blob.bin").read_bytes()
    assert hashlib.sha256(blob).digest() == hashlib.sha256(payload).digest()


def test_with_content_length_and_unknown_parts(server: Server) -> None:
    extra: Part = ("comment", [b"ignored " * 1000], None)
    data = b"".join(body(extra, metadata(), tar_part(real_tar(b"payload")), ("o", [b"zz"], "x")))
    response, dest = post(server, data)  # bytes: httpx sends a Content-Length
    assert response.status_code == 200, response.text
    assert (dest / "project" / "blob.bin").read_bytes() == b"payload"
    assert files_in(dest) == ["blob.bin", "main.py", "project"]  # nothing else stays


def test_empty_tar_part_is_accepted(server: Server) -> None:
    response, dest = post(server, body(metadata(), ("tar", [], "empty.tar")))
    assert response.status_code == 200, response.text
    assert response.json()["project"]["files"] == []
    assert files_in(dest) == ["project"]


@pytest.mark.parametrize(
    ("parts", "message"),
    [
        ([metadata()], "no `tar` part"),
        ([("tar", [real_tar(b"x" * 3 * MiB)], "p.tar")], "no `metadata` part"),
        ([metadata(), tar_part(real_tar()), tar_part(real_tar())], "more than one `tar` part"),
        ([metadata(), metadata(), tar_part(real_tar())], "more than one `metadata` part"),
        ([], "no `tar` part"),
    ],
    ids=["no-tar", "no-metadata", "two-tars", "two-metadata", "no-parts"],
)
def test_missing_or_repeated_parts(server: Server, parts: list[Part], message: str) -> None:
    response, dest = post(server, body(*parts))
    assert response.status_code == 400
    assert message in response.json()["error"]
    assert files_in(dest) == []  # the tar written before the error is gone


def test_body_without_closing_boundary(server: Server) -> None:
    response, dest = post(server, body(metadata(), tar_part(real_tar(b"x" * MiB)), close=False))
    assert response.status_code == 400
    assert "ended before its closing boundary" in response.json()["error"]
    assert files_in(dest) == []


def test_malformed_multipart(server: Server) -> None:
    junk = [b"--" + BOUNDARY.encode() + b"\r\nno colon in this header line\r\n\r\n"]
    response, dest = post(server, junk)
    assert response.status_code == 400
    assert "malformed" in response.json()["error"]
    assert files_in(dest) == []


@pytest.mark.parametrize(
    "content_type",
    ["application/json", "multipart/form-data", "multipart/mixed; boundary=abc", ""],
)
def test_not_multipart_form_data(server: Server, content_type: str) -> None:
    response, dest = post(server, b"{}", headers={"content-type": content_type})
    assert response.status_code == 400
    assert "multipart/form-data with a boundary" in response.json()["error"]
    assert files_in(dest) == []


def test_metadata_over_its_limit(server: Server) -> None:
    big = metadata({"stdin": "x" * 5000})
    response, dest = post(server, body(tar_part(real_tar()), big), max_metadata=4096)
    assert response.status_code == 400
    assert "`metadata` part is larger than 4096 bytes" in response.json()["error"]
    assert files_in(dest) == []


def _zip() -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("main.py", "print(1)")
    return buf.getvalue()


@pytest.mark.parametrize(
    ("kind", "data"),
    [
        ("gzip", gzip.compress(real_tar(os.urandom(MiB)))),
        ("zip", _zip()),
        ("gzip", b"\x1f\x8b"),  # shorter than the sniffing window: judged at the part's end
    ],
    ids=["gzip", "zip", "tiny-gzip"],
)
def test_compressed_tar_part_is_refused(server: Server, kind: str, data: bytes) -> None:
    response, dest = post(server, body(metadata(), tar_part(data)))
    assert response.status_code == 400
    assert response.json() == {
        "error": f"only uncompressed tar archives are accepted (got {kind})",
        "kind": "UnsupportedArchive",
    }
    assert files_in(dest) == []


def test_declared_length_over_the_limit_is_refused_up_front(server: Server) -> None:
    data = b"".join(body(metadata(), tar_part(real_tar(b"x" * 2 * MiB))))
    response, dest = post(server, data, max_bytes=MiB)
    assert response.status_code == 413
    assert response.json()["error"] == f"the request body is larger than the maximum of {MiB} bytes"
    assert files_in(dest) == []


def test_streamed_body_over_the_limit_is_cut_off(server: Server) -> None:
    """No Content-Length: the limit is hit while streaming, after some of the tar was written.
    The client (like most) reads only once it has sent everything: the 413 must survive
    that (the server reads and drops the rest instead of resetting the connection)."""

    def chunks() -> Iterator[bytes]:
        info = tarfile.TarInfo("big.bin")
        info.size = 64 * MiB  # a valid start of an archive: only the limit stops it
        yield info.tobuf(tarfile.PAX_FORMAT)
        block = b"\0" * MiB
        for _ in range(64):
            yield block

    for _ in range(5):  # a reset lost the response now and then: never again
        response, dest = post(
            server, body(metadata(), ("tar", chunks(), "p.tar")), max_bytes=8 * MiB
        )
        assert response.status_code == 413
        assert "maximum of 8388608 bytes" in response.json()["error"]
        assert files_in(dest) == []  # what was extracted before the limit was removed


def test_over_the_limit_is_answered_while_the_client_still_sends(server: Server) -> None:
    """The 413 comes as soon as the limit is passed, not after the whole body."""
    port = int(server.url.rsplit(":", 1)[1])
    info = tarfile.TarInfo("big.bin")
    info.size = 64 * MiB
    head = b"".join(body(metadata(), close=False)) + part_head("tar", "p.tar")
    head += info.tobuf(tarfile.PAX_FORMAT)
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(
            f"POST /upload?id={uuid.uuid4().hex}&max_bytes={8 * MiB} HTTP/1.1\r\nHost: x\r\n"
            f"Content-Type: {CONTENT_TYPE}\r\nContent-Length: {80 * MiB}\r\n\r\n".encode()
            + head
        )
        reply, sent = b"", 0
        while b"\r\n\r\n" not in reply and sent < 64 * MiB:
            sock.sendall(b"\0" * (256 * 1024))
            sent += 256 * 1024
            sock.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                reply += sock.recv(65536)
            sock.setblocking(True)
    assert reply.startswith(b"HTTP/1.1 413 "), reply[:100]
    assert sent < 32 * MiB  # answered at the limit (8 MiB), long before the body's end


def test_expect_continue_client_gets_413_before_sending_anything(server: Server) -> None:
    port = int(server.url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(
            f"POST /upload?id={uuid.uuid4().hex}&max_bytes={MiB} HTTP/1.1\r\nHost: x\r\n"
            f"Content-Type: {CONTENT_TYPE}\r\nContent-Length: {10 * MiB}\r\n"
            "Expect: 100-continue\r\n\r\n".encode()
        )
        reply = b""
        while b"\r\n\r\n" not in reply:
            reply += sock.recv(4096)
    assert reply.startswith(b"HTTP/1.1 413 ")  # not "100 Continue": the body is never sent


def test_client_disconnect_mid_body_leaves_nothing(server: Server) -> None:
    request_id = uuid.uuid4().hex
    head = b"".join(body(metadata(), close=False)) + part_head("tar", "p.tar")
    port = int(server.url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(
            f"POST /upload?id={request_id} HTTP/1.1\r\nHost: x\r\n"
            f"Content-Type: {CONTENT_TYPE}\r\nContent-Length: {100 * MiB}\r\n\r\n".encode()
            + head
            + real_tar()[:512]
            + b"\0" * (5 * MiB)
        )
        deadline = time.monotonic() + 10
        while not (server.dir(request_id) / ".project.incoming").exists():
            assert time.monotonic() < deadline
            time.sleep(0.01)
    deadline = time.monotonic() + 10
    while files_in(server.dir(request_id)):
        assert time.monotonic() < deadline, "the partial upload was not removed"
        time.sleep(0.05)


def test_large_body_streams_with_flat_memory(server: Server) -> None:
    size = 200 * MiB
    info = tarfile.TarInfo("big.bin")
    info.size = size
    header = info.tobuf(tarfile.PAX_FORMAT)
    block = bytes(range(256)) * 4096  # 1 MiB

    def chunks() -> Iterator[bytes]:
        yield header
        for _ in range(size // MiB):
            yield block
        yield b"\0" * 1024

    post(server, body(metadata(), tar_part(real_tar())))  # warm up: imports, thread pool
    server.reset_peak()
    before = server.status()["VmRSS"]
    response, dest = post(server, body(metadata(), ("tar", chunks(), "big.tar")))
    peak = server.status()["VmHWM"]
    assert response.status_code == 200, response.text
    big = dest / "project" / "big.bin"
    assert big.stat().st_size == size
    with big.open("rb") as f:
        assert f.read(MiB) == block
    big.unlink()
    assert (peak - before) * 1024 < 64 * MiB, f"server RSS grew by {(peak - before) // 1024} MiB"


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
async def test_disk_full_is_a_server_error_and_leaves_nothing(tiny_fs: Path) -> None:
    data = b"".join(body(metadata(), tar_part(real_tar(os.urandom(3 * MiB)))))
    with pytest.raises(errors.ExecutorError, match="could not be extracted") as caught:
        await receive_exec_upload(
            asgi_request(data, 65536), tiny_fs, max_bytes=len(data), max_entries=10
        )
    assert caught.value.status_code == 500
    assert not any(os.scandir(tiny_fs))


# --- chunk boundaries, exactly, through the ASGI interface ------------------------------------


def asgi_request(data: bytes, chunk: int) -> Request:
    pieces = [data[i : i + chunk] for i in range(0, len(data), chunk)] or [b""]
    messages: list[Message] = [
        {"type": "http.request", "body": p, "more_body": i < len(pieces) - 1}
        for i, p in enumerate(pieces)
    ]

    async def receive() -> Message:
        return messages.pop(0) if messages else {"type": "http.disconnect"}

    scope = {
        "type": "http",
        "method": "POST",
        "path": "/upload",
        "headers": [(b"content-type", CONTENT_TYPE.encode())],
    }
    return Request(scope, receive)


@pytest.mark.parametrize("chunk", [1, 2, 3, 17, 511, 512, 513, 4096, 65536])
async def test_any_chunking_gives_the_same_bytes(tmp_path: Path, chunk: int) -> None:
    payload = tricky_payload(20_000 if chunk < 17 else 300_000)
    data = b"".join(body(tar_part(real_tar(payload)), metadata({"a": "--" + BOUNDARY})))
    got = await receive_exec_upload(
        asgi_request(data, chunk), tmp_path, max_bytes=len(data), max_entries=10
    )
    assert (got.project.root / "blob.bin").read_bytes() == payload
    assert json.loads(got.metadata) == {"a": "--" + BOUNDARY}


async def test_missing_dest_dir_is_created_and_removed_again_on_error(tmp_path: Path) -> None:
    good = b"".join(body(metadata(), tar_part(real_tar())))
    dest = tmp_path / "staging" / "exe_1"
    got = await receive_exec_upload(
        asgi_request(good, 4096), dest, max_bytes=len(good), max_entries=10
    )
    assert got.project.root == dest / "project"
    assert (got.project.root / "main.py").read_bytes() == b"print('hi')\n"
    no_metadata = b"".join(body(tar_part(real_tar())))
    other = tmp_path / "staging" / "exe_2"
    with pytest.raises(errors.BadRequest, match="no `metadata` part"):
        await receive_exec_upload(
            asgi_request(no_metadata, 4096), other, max_bytes=MiB, max_entries=10
        )
    assert not other.exists()


async def test_limit_counts_every_body_byte(tmp_path: Path) -> None:
    data = b"".join(body(metadata(), tar_part(real_tar())))
    got = await receive_exec_upload(
        asgi_request(data, 1000), tmp_path, max_bytes=len(data), max_entries=10
    )
    assert got.project.files == ("main.py", "blob.bin")
    shutil.rmtree(got.project.root)
    with pytest.raises(errors.PayloadTooLarge):
        await receive_exec_upload(
            asgi_request(data, 1000), tmp_path, max_bytes=len(data) - 1, max_entries=10
        )
    assert not any(os.scandir(tmp_path))
