"""The Docker backend's pure parts: image resolution, argv mapping, the waiter protocol,
the container configuration. No daemon needed."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
from python_executor_server.errors import BadRequest
from python_executor_server.sandbox.base import CollectedOutput, Mount
from python_executor_server.sandbox.docker import default_limits, resolve_image
from python_executor_server.sandbox.docker_pool import Profile, host_config
from python_executor_server.sandbox.docker_protocol import (
    ProtocolError,
    ReplyParser,
    encode_job,
    image_argv,
    pack_workspace,
    waiter_command,
)
from python_executor_server.settings import Settings


def settings(**kw: object) -> Settings:
    return Settings(**kw)  # type: ignore[arg-type]


def test_default_image_when_nothing_asked() -> None:
    assert resolve_image(settings(default_image="img:1"), None, None) == "img:1"


def test_python_version_maps_to_configured_images() -> None:
    s = settings(docker_images={"3.12": "py:12", "3.11": "py:11"})
    assert resolve_image(s, None, "3.11") == "py:11"
    with pytest.raises(BadRequest, match=r"3\.9.*available: 3\.11, 3\.12"):
        resolve_image(s, None, "3.9")


def test_python_version_defaults_to_slim_images() -> None:
    assert resolve_image(settings(), None, "3.12") == "python:3.12-slim"


def test_docker_image_must_be_allowed() -> None:
    s = settings(default_image="sandbox:latest", docker_images={"3.12": "py:12"})
    assert resolve_image(s, "py:12", None) == "py:12"
    assert resolve_image(s, "sandbox:latest", "3.12") == "sandbox:latest"  # docker_image wins
    with pytest.raises(BadRequest) as err:
        resolve_image(s, "evil/miner:latest", None)
    assert "py:12" in err.value.message and "sandbox:latest" in err.value.message


def test_allow_list_extends_and_takes_patterns() -> None:
    s = settings(docker_allowed_images=["python:3.*-slim", "extra:1"])
    assert resolve_image(s, "python:3.13-slim", None) == "python:3.13-slim"
    assert resolve_image(s, "extra:1", None) == "extra:1"
    with pytest.raises(BadRequest):
        resolve_image(s, "python:3.13", None)


@pytest.mark.parametrize(
    ("argv0", "mapped"),
    [
        ("/root/.pyenv/versions/3.12.1/bin/python3.12", "python3"),
        ("/usr/bin/python3", "python3"),
        ("/opt/x/bin/python", "python3"),
        ("/host/interp", "python3"),  # the run's host interpreter, whatever its name
        ("/bin/sh", "/bin/sh"),
        ("/usr/bin/python3-config", "/usr/bin/python3-config"),
    ],
)
def test_image_argv(argv0: str, mapped: str) -> None:
    assert image_argv([argv0, "-I", "main.py"], "/host/interp") == [mapped, "-I", "main.py"]


def _docker_frame(stream: int, data: bytes) -> bytes:
    return struct.pack(">BxxxL", stream, len(data)) + data


def _frame(kind: bytes, data: bytes) -> bytes:
    return kind + struct.pack(">I", len(data)) + data


def test_reply_parser_survives_any_split() -> None:
    exit_json = json.dumps({"exit_code": 0, "cpu_ms": 5, "peak_memory_mb": 3.5, "oom_kills": 0})
    payload = b"".join(
        [
            _frame(b"o", b"hello "),
            _frame(b"e", b"warn"),
            _frame(b"r", b"{}"),
            _frame(b"o", b"world"),
            _frame(b"x", exit_json.encode()),
        ]
    )
    wire = (
        _docker_frame(1, payload[:7])
        + _docker_frame(2, b"waiter noise")
        + _docker_frame(1, payload[7:])
    )
    for step in (1, 3, 1000):
        sink = CollectedOutput()
        parser = ReplyParser(sink, result_cap=100)
        for i in range(0, len(wire), step):
            parser.feed(wire[i : i + step])
        assert (sink.text("stdout"), sink.text("stderr")) == ("hello world", "warn")
        assert parser.result == b"{}" and parser.exit is not None and parser.exit.cpu_ms == 5
        assert parser.waiter_stderr == b"waiter noise"


def test_reply_parser_caps_the_result_and_rejects_garbage() -> None:
    parser = ReplyParser(CollectedOutput(), result_cap=4)
    parser.feed(_docker_frame(1, _frame(b"r", b"123456")))
    assert parser.result == b"1234"
    with pytest.raises(ProtocolError):
        parser.feed(_docker_frame(1, _frame(b"?", b"")))


def test_job_encoding() -> None:
    job = encode_job(["python3"], {"A": "1"}, result_fd=3, tar_size=10, stdin_size=2, timeout=5)
    (size,) = struct.unpack(">I", job[:4])
    assert json.loads(job[4 : 4 + size])["env"] == {"A": "1"} and len(job) == 4 + size


def test_waiter_command_is_self_contained() -> None:
    cmd = waiter_command()
    assert cmd[:4] == ["python3", "-I", "-S", "-c"]
    imports = [line for line in cmd[4].splitlines() if line.startswith(("import ", "from "))]
    assert imports and not [
        line for line in imports if "python_executor" in line or "from ." in line
    ]
    compile(cmd[4], "waiter", "exec")


def test_host_config_enforces_everything() -> None:
    s = settings()
    limits = default_limits(s)
    cfg = host_config(Profile.of("img", limits, s))
    assert (
        cfg["read_only"]
        and cfg["cap_drop"] == ["ALL"]
        and cfg["security_opt"] == ["no-new-privileges"]
    )
    assert cfg["mem_limit"] == cfg["memswap_limit"] == f"{limits.memory_mb}m"
    assert cfg["network_mode"] == "none" and cfg["pids_limit"] == limits.pids
    assert f"size={limits.disk_mb}m" in cfg["tmpfs"]["/work"] and "uid=1000" in cfg["tmpfs"]["/tmp"]
    assert cfg["binds"] == {} and cfg["auto_remove"] and cfg["log_config"]["type"] == "none"
    with_net = host_config(Profile.of("img", default_limits(s, network=True), s))
    assert with_net["network_mode"] == s.docker_network
    mounted = host_config(Profile.of("img", limits, s, (Mount(Path("/envs/a"), "/envs/a"),)))
    assert mounted["binds"] == {"/envs/a": {"bind": "/envs/a", "mode": "ro"}}


def test_pack_workspace(tmp_path: Path) -> None:
    import tarfile

    (tmp_path / "main.py").write_text("print(1)")
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "m.py").write_text("")
    (tmp_path / "link").symlink_to("main.py")
    spool, size = pack_workspace(tmp_path)
    with spool, tarfile.open(fileobj=spool) as tar:
        members = {m.name: m for m in tar.getmembers()}
    assert set(members) == {"main.py", "pkg", "pkg/m.py", "link"}
    assert all(m.uid == 1000 for m in members.values()) and members["link"].issym()
    assert size > 0
