from __future__ import annotations

import io
import json
import tarfile
from typing import Any

import httpx2


def tar_of(files: dict[str, str | bytes], links: dict[str, str] | None = None) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, content in files.items():
            data = content.encode() if isinstance(content, str) else content
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mode = 0o644
            tar.addfile(info, io.BytesIO(data))
        for name, target in (links or {}).items():
            info = tarfile.TarInfo(name)
            info.type = tarfile.SYMTYPE
            info.linkname = target
            tar.addfile(info)
    return buf.getvalue()


def post_exec(
    client: httpx2.Client,
    tar: bytes,
    metadata: dict[str, Any] | str | None,
    mode: str = "sync",
) -> httpx2.Response:
    files: dict[str, Any] = {"tar": ("project.tar", tar, "application/x-tar")}
    if metadata is not None:
        text = metadata if isinstance(metadata, str) else json.dumps(metadata)
        files["metadata"] = (None, text, "application/json")
    return client.post(f"/api/v1/exec/{mode}", files=files)


def run(client: httpx2.Client, files: dict[str, str], **metadata: Any) -> dict[str, Any]:
    response = post_exec(client, tar_of(files), metadata)
    assert response.status_code == 200, response.text
    result: dict[str, Any] = response.json()
    return result


def eval_(client: httpx2.Client, code: str, **body: Any) -> dict[str, Any]:
    response = client.post("/api/v1/eval", json={"code": code, **body})
    assert response.status_code == 200, response.text
    result: dict[str, Any] = response.json()
    return result
