"""``python -c <source>`` without compiling the source at every start.

The eval driver runs as ``-c`` source (no backend has to mount it), and the
interpreter compiles it at each start: 2.5 ms of a sandbox's ~15 ms of CPU. The
bwrap backend has the run's own interpreter compile it once (marshal's format is
the interpreter's) and starts ``-c`` with a loader instead::

    exec(__import__('marshal').loads(open(<fd>, 'rb').read()))

reading the code object from a memfd it passes at ``<fd>`` (closed as soon as it
is read, before any of the program runs). The program runs in the same
``__main__`` as with ``-c <source>``; ``marshal`` (built in) is the one module more
in ``sys.modules``.

Usage::

    codes = Precompiled()
    code = await codes.get(interpreter, source)   # None: run the source as it is
    argv = [python, "-I", "-c", loader(fd)]
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import anyio
import structlog

from .base import Interpreter

log = structlog.get_logger("python_executor.sandbox.precompile")

_COMPILE = (
    "import marshal, sys\n"
    "code = compile(sys.stdin.buffer.read().decode(), '<string>', 'exec', dont_inherit=True)\n"
    "sys.stdout.buffer.write(marshal.dumps(code))\n"
)
COMPILE_TIMEOUT = 30.0


def loader(fd: int) -> str:
    return f"exec(__import__('marshal').loads(open({fd}, 'rb').read()))"


def c_source(argv: Sequence[str], prestart: int) -> str | None:
    """The ``-c`` source of a launch prefix ``<python> [flags] -c <source>``, if it is one."""
    prefix = argv[:prestart]
    if len(prefix) >= 3 and prefix[-2] == "-c" and all(a.startswith("-") for a in prefix[1:-1]):
        return prefix[-1]
    return None


class Precompiled:
    """Code objects by (interpreter, source), compiled on first use; a failure is
    remembered as None (the source is then run as it is)."""

    def __init__(self) -> None:
        self._codes: dict[tuple[str, str], bytes | None] = {}
        self._lock = anyio.Lock()

    async def get(self, interpreter: Interpreter, source: str) -> bytes | None:
        key = (str(interpreter.executable), hashlib.sha256(source.encode()).hexdigest())
        if key not in self._codes:
            async with self._lock:
                if key not in self._codes:
                    self._codes[key] = await _compile(interpreter, source)
        return self._codes[key]


async def _compile(interpreter: Interpreter, source: str) -> bytes | None:
    argv = [str(interpreter.executable), "-I", "-S", "-c", _COMPILE]
    try:
        with anyio.fail_after(COMPILE_TIMEOUT):
            done = await anyio.run_process(argv, input=source.encode(), check=False)
    except (OSError, TimeoutError) as exc:
        log.warning("could not precompile a launch program", python=argv[0], error=str(exc))
        return None
    if done.returncode != 0 or not done.stdout:
        stderr = done.stderr.decode(errors="replace").strip()[-300:]
        log.warning("could not precompile a launch program", python=argv[0], error=stderr)
        return None
    return bytes(done.stdout)
