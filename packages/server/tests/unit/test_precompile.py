"""A ``-c`` program compiled once and loaded from an fd behaves as ``-c <source>``."""

from __future__ import annotations

import os
import subprocess

import pytest
from python_executor_server.execution.interpreters import discover_interpreters
from python_executor_server.sandbox.base import Interpreter
from python_executor_server.sandbox.precompile import Precompiled, c_source, loader
from python_executor_server.settings import Settings

INTERPRETERS = discover_interpreters(Settings())
SOURCE = """
from __future__ import annotations
import sys
def f(x: Undefined) -> None: pass
print(__name__, sys.argv, f.__annotations__['x'], 'é', sep='|')
print(sorted(n for n in globals() if not n.startswith('__')), open.__module__)
"""


@pytest.fixture(params=list(INTERPRETERS.values()), ids=list(INTERPRETERS))
def interpreter(request: pytest.FixtureRequest) -> Interpreter:
    return request.param  # type: ignore[no-any-return]


def _run(argv: list[str], pass_fds: tuple[int, ...] = ()) -> str:
    done = subprocess.run(argv, pass_fds=pass_fds, capture_output=True, check=True)
    return done.stdout.decode()


async def test_loaded_code_runs_like_its_source(interpreter: Interpreter) -> None:
    code = await Precompiled().get(interpreter, SOURCE)
    assert code is not None
    fd = os.memfd_create("code")
    try:
        os.write(fd, code)
        os.lseek(fd, 0, os.SEEK_SET)
        python = str(interpreter.executable)
        loaded = _run([python, "-I", "-c", loader(fd), "a"], pass_fds=(fd,))
    finally:
        os.close(fd)
    assert loaded == _run([python, "-I", "-c", SOURCE, "a"])
    assert loaded.startswith("__main__|['-c', 'a']|Undefined|é\n")


async def test_a_source_that_does_not_compile_is_run_as_it_is() -> None:
    interpreter = next(iter(INTERPRETERS.values()))
    assert await Precompiled().get(interpreter, "def (:") is None


def test_c_source_finds_the_program_of_a_launch_prefix() -> None:
    assert c_source(("/usr/bin/python3", "-I", "-c", "pass", "--x"), 4) == "pass"
    assert c_source(("/usr/bin/python3", "/work/main.py"), 2) is None
    assert c_source(("/usr/bin/python3", "-I", "-c"), 3) is None
