"""POST /api/v1/eval through real HTTP into the real sandbox."""

from __future__ import annotations

import httpx2
import pytest
from api_helpers import eval_

pytestmark = [pytest.mark.sandbox, pytest.mark.timeout(120)]


@pytest.mark.parametrize(
    ("code", "expected"),
    [
        ("1 + 1", "2"),
        ("x = 5\nx * 2", "10"),
        ("'hi'", "'hi'"),
        ("None", None),
        ("x = 3", None),
        ("import math\nmath.sqrt(16)", "4.0"),
        ("def f(a):\n    return a * 3\n\n[\n    f(1),\n    f(2),\n]", "[3, 6]"),
        ("print('out')\n{'a': 1}", "{'a': 1}"),
    ],
)
def test_last_expression(client: httpx2.Client, code: str, expected: str | None) -> None:
    body = eval_(client, code, eval_last_expr=True)
    assert body["status"] == "completed"
    assert body["exit_code"] == 0
    assert body["result"] == expected
    assert expected is None or expected not in body["stdout"].replace("{'a': 1}", "")


def test_result_is_out_of_band(client: httpx2.Client) -> None:
    body = eval_(client, "print('out')\n42", eval_last_expr=True)
    assert body["stdout"] == "out\n"
    assert body["result"] == "42"


def test_without_eval_last_expr_no_result(client: httpx2.Client) -> None:
    body = eval_(client, "print('a')\n42")
    assert body["result"] is None
    assert body["stdout"] == "a\n"


def test_syntax_error(client: httpx2.Client) -> None:
    body = eval_(client, "x = 1\ny = (\n", eval_last_expr=True)
    assert body["status"] == "completed"
    assert body["exit_code"] == 1
    assert body["error_type"] == "SyntaxError"
    assert body["error_line"] == 2
    assert "SyntaxError" in body["stderr"]


def test_name_error_line(client: httpx2.Client) -> None:
    body = eval_(client, "a = 1\nb = 2\nprint(undefined_name)\n")
    assert body["exit_code"] == 1
    assert body["error_type"] == "NameError"
    assert body["error_line"] == 3
    assert "Traceback (most recent call last)" in body["stderr"]


def test_dotted_error_type(client: httpx2.Client) -> None:
    body = eval_(client, "import json\njson.loads('{')")
    assert body["error_type"] == "json.decoder.JSONDecodeError"
    assert body["error_line"] == 2


def test_stdin_env_args(client: httpx2.Client) -> None:
    code = (
        "import os, sys\n"
        "print(sys.stdin.read().upper())\n"
        "print(os.environ['GREETING'])\n"
        "print(sys.argv[1:])"
    )
    body = eval_(
        client, code, stdin="abc", env_vars=["GREETING=hello world"], script_args=["a b", "c"]
    )
    assert body["stdout"] == "ABC\nhello world\n['a b', 'c']\n"


def test_files_with_entrypoint(client: httpx2.Client) -> None:
    files = [
        {"name": "lib/helper.py", "content": "def twice(x):\n    return 2 * x\n"},
        {"name": "lib/__init__.py", "content": ""},
        {"name": "run.py", "content": "from lib.helper import twice\nprint(twice(21))"},
    ]
    response = client.post("/api/v1/eval", json={"files": files, "entrypoint": "run.py"})
    assert response.status_code == 200, response.text
    assert response.json()["stdout"] == "42\n"


def test_files_default_entrypoint_is_first(client: httpx2.Client) -> None:
    files = [
        {"name": "first.py", "content": "print('first')"},
        {"name": "second.py", "content": "print('second')"},
    ]
    response = client.post("/api/v1/eval", json={"files": files})
    assert response.json()["stdout"] == "first\n"


def test_every_python_version(client: httpx2.Client) -> None:
    versions = client.get("/health").json()["python_versions"]
    assert versions
    for version in versions:
        body = eval_(
            client,
            "import sys\nprint(f'{sys.version_info[0]}.{sys.version_info[1]}')",
            python_version=version,
        )
        assert body["stdout"].strip() == version


def test_docker_image_name_selects_version(client: httpx2.Client) -> None:
    versions = client.get("/health").json()["python_versions"]
    version = versions[0]
    body = eval_(
        client, "import sys\nprint(sys.version_info[:2])", docker_image=f"python:{version}-slim"
    )
    assert body["stdout"].strip() == str(tuple(int(x) for x in version.split(".")))


@pytest.mark.parametrize(
    ("body", "status", "fragment"),
    [
        ({}, 400, "code"),
        ({"code": "1", "python_version": "2.7"}, 400, "available"),
        ({"code": "1", "config": {"timeout_seconds": 0}}, 400, "timeout_seconds"),
        ({"code": "1", "config": {"memory_mb": -5}}, 400, "memory_mb"),
        ({"code": "1", "config": {"memory_mb": 10**9}}, 400, "maximum"),
        ({"code": "1", "config": {"timeout_seconds": "soon"}}, 400, "timeout_seconds"),
        ({"code": "1", "env_vars": ["NOEQUALS"]}, 400, "env_vars"),
        ({"code": "x" * (100 * 1024 + 1)}, 413, "maximum"),
        ({"files": [{"name": "../evil.py", "content": "1"}]}, 400, "relative path"),
        ({"code": "1", "entrypoint": "missing.py"}, 400, "entrypoint"),
    ],
)
def test_bad_requests(
    client: httpx2.Client, body: dict[str, object], status: int, fragment: str
) -> None:
    response = client.post("/api/v1/eval", json=body)
    assert response.status_code == status, response.text
    assert fragment in response.json()["error"]


def test_not_json(client: httpx2.Client) -> None:
    response = client.post(
        "/api/v1/eval", content=b"{not json", headers={"content-type": "application/json"}
    )
    assert response.status_code == 400
    assert "error" in response.json()


def test_body_over_its_cap_is_refused_unread(client: httpx2.Client) -> None:
    """The eval body is capped (8x the code limit + 64 KiB) before it is parsed: declared
    too large, or streamed without a length past the cap."""
    cap = 8 * 100 * 1024 + 65536
    body = b'{"code": "' + b"x" * cap + b'"}'
    declared = client.post(
        "/api/v1/eval", content=body, headers={"content-type": "application/json"}
    )
    assert declared.status_code == 413
    assert declared.json() == {"error": f"request body is over {cap} bytes"}
    streamed = client.post(
        "/api/v1/eval",
        content=iter([body[i : i + 65536] for i in range(0, len(body), 65536)]),
        headers={"content-type": "application/json"},
    )
    assert streamed.status_code == 413


def test_other_content_types_and_methods_answer_as_the_route(client: httpx2.Client) -> None:
    """Only JSON bodies EvalRequest accepts take the fast way; the rest is FastAPI's."""
    as_text = client.post(
        "/api/v1/eval", content=b'{"code": "print(1)"}', headers={"content-type": "text/plain"}
    )
    assert as_text.status_code == 400
    assert as_text.json()["error"].startswith("invalid request")
    assert client.get("/api/v1/eval").status_code == 405
    ok = client.post("/api/v1/eval", json={"code": "print(1)"})
    assert ok.headers["content-type"] == "application/json"
    assert ok.json()["stdout"] == "1\n"
