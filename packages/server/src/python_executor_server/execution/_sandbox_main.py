"""The program every run executes inside the sandbox.

The host runs it as ``-c`` source (see ``driver.py``), so nothing has to be mounted::

    python -I -c <this> [--result-fd N] [--eval] [--pre CMD]... [--path DIR]... -- main.py ARG...
    python -I -c <this> --job-fd N

The second form is how the bwrap backend starts it, ahead of the request when it can
(``sandbox/base.py``): it writes one byte to the socket N (ready), blocks until the job
arrives there (the options above and the whole environment, ``base.encode_job``), makes
``os.environ`` exactly the job's environment and goes on as the first form would. A run
from the pool and a cold run both pass through here: they differ only in how long the
process waited.

Standard library only; Python 3.10+ (3.7+ works too, for old images). It runs the
pre-commands, then the entrypoint as ``__main__`` exactly as ``python main.py ARG...`` would
(same globals, ``sys.argv``, ``sys.path[0]``, tracebacks, exit codes, thread joining and
atexit), and at exit writes one JSON line to ``--result-fd`` — never to stdout::

    {"result": "2", "error_type": null, "error_line": null, "pre_command_failed": null}

(plus ``"exit_code"`` when a pre-command failed and the run ended with its status),
and last, when nothing of the process can run Python code any more, ``exit N``: the
code it exits with (``_end``; the host may take it as the run's end, ``base.end_code``).
``result`` is ``repr()`` of a trailing expression (``eval_last_expr``): null when the
last statement is not an expression or its value is None, ``"<repr failed: T: msg>"``
when ``repr()`` raised, cut at ``_RESULT_MAX_CHARS``. The line is written by the first
atexit handler registered, so it runs after every handler of the program.

It ends the run as the interpreter would, as far as a program can tell — non-daemon
threads joined, atexit callbacks run, the globals of ``__main__`` and of the project's
own modules dropped (their finalizers run, their files are flushed), stdout and stderr
flushed — and then calls ``os._exit`` instead of tearing the interpreter down, which is
most of a small run's exit time (``_exit``). A ``KeyboardInterrupt``, or an exit status
outside C's int range, ends through the interpreter itself.

Start-up cost matters (every run pays it): ``json`` and ``ast`` import ``re``, ``enum`` and
more, as long as the interpreter's own start-up, so neither is imported here.
"""

from __future__ import annotations  # annotations stay text: older images' Pythons run this too

# Everything is imported before the program's directories join sys.path.
import _signal  # type: ignore[import-not-found]  # (signal.py: the same, plus enum)
import _thread
import atexit
import builtins
import io
import os
import sys
import types
from importlib.machinery import SourceFileLoader

_RESULT_MAX_CHARS = 1 << 20
_report: dict[str, object] = {
    "result": None,
    "error_type": None,
    "error_line": None,
    "pre_command_failed": None,
}


def main() -> None:
    argv = sys.argv[1:]
    if argv[:1] == ["--job-fd"] and "_zygote_serve" in globals():  # a zygote (zygote.py)
        argv = globals()["_zygote_serve"](int(argv[1]))  # returns in each run, with its job
    if argv[:1] == ["--job-fd"]:
        argv = _receive_job(int(argv[1]))
    options, (entrypoint, *args) = _options(argv)
    if "--result-fd" in options:
        _open_channel(int(options["--result-fd"][-1]))
    _honour_environment()
    loaded = set(sys.modules)
    try:
        _run_pre_commands(options.get("--pre", []))
        _run_entrypoint(entrypoint, args, "--eval" in options, options.get("--path", []))
    except SystemExit as exc:
        status = _exit_status(exc)
        if status is None:
            raise  # a status the interpreter itself must make sense of
    except KeyboardInterrupt:
        raise  # the interpreter ends by SIGINT, after finalizing
    except BaseException:
        status = 1  # printed already (_fail)
    else:
        status = 0
    _exit(status, loaded, os.path.dirname(os.path.realpath(entrypoint)))


# --- the end --------------------------------------------------------------------------


def _exit_status(exc: SystemExit) -> int | None:
    """The exit status the interpreter makes of ``exc`` (printing a message code as it
    does); None for an int out of C range, left to the interpreter."""
    code = exc.code
    if code is None:
        return 0
    if isinstance(code, int):
        return code if -(1 << 31) <= code < (1 << 31) else None
    stderr = sys.stderr
    try:
        if stderr is not None:
            stderr.write(f"{code}\n")
    except Exception:
        pass
    return 1


def _exit(status: int, loaded: set[str], project: str) -> None:
    """End the run as the interpreter would, as far as a program can tell, without
    tearing the interpreter down (most of a small run's exit time, and in a sandbox
    forked from a zygote a copy of every page it touches): wait for non-daemon
    threads, run the atexit callbacks, drop the globals of ``__main__`` and of the
    project's own modules (their objects' finalizers run, their files are flushed and
    closed), flush stdout and stderr (status 120 if that fails), then ``os._exit``."""
    threading = sys.modules.get("threading")
    if threading is not None:
        try:  # noqa: SIM105  (contextlib is not loaded: keep the end lean)
            threading._shutdown()
        except BaseException:
            pass  # as the interpreter: ignored
    import atexit as _atexit

    _atexit._run_exitfuncs()
    for name in reversed(list(sys.modules)):
        module = sys.modules.get(name)
        path = getattr(module, "__file__", None)
        own = name == "__main__" or (
            name not in loaded and isinstance(path, str) and path.startswith(project + os.sep)
        )
        if own and module is not None and module.__dict__ is not globals():
            module.__dict__.clear()
    import gc

    gc.collect()
    for stream in (sys.stdout, sys.stderr):
        try:
            if stream is not None and not stream.closed:
                stream.flush()
        except Exception:
            status = 120
    _end(status & 0xFF)
    os._exit(status)


def _end(code: int) -> None:
    """Tell the host the run's exit code on the report channel (``exit N``, after the
    report line) and close the output, when nothing of this process can run Python code
    any more (no other thread, every signal blocked): the code is then the one the
    process exits with. Once every copy of stdout, stderr and the channel is closed,
    the host knows the run's output is complete and ends the run (it kills whatever the
    program left running) without waiting for this process's exit."""
    if _channel is None or _channel[0] != os.getpid() or _thread._count():
        return  # no channel, a forked child of the program, or threads still running
    _pid, fd, identity = _channel
    _signal.pthread_sigmask(_signal.SIG_BLOCK, _signal.valid_signals())
    if _identity(fd) != identity:
        return  # the program closed the channel and reused its number
    try:
        os.write(fd, b"\nexit %d\n" % code)
    except OSError:
        return
    for number in (1, 2, fd):
        try:  # noqa: SIM105  (contextlib is not loaded: keep the end lean)
            os.close(number)
        except OSError:
            pass


def _options(argv: list[str]) -> tuple[dict[str, list[str]], list[str]]:
    """``--name value`` pairs (``--eval`` alone) up to ``--``; then the program's command."""
    options: dict[str, list[str]] = {}
    i = 0
    while argv[i] != "--":
        if argv[i] == "--eval":
            options["--eval"] = []
            i += 1
        else:
            options.setdefault(argv[i], []).append(argv[i + 1])
            i += 2
    return options, argv[i + 1 :]


# --- the job ----------------------------------------------------------------------------


def _receive_job(fd: int) -> list[str]:
    """Signal ready, wait for the job, take its environment; its arguments are returned."""
    # Making the AST classes takes as long as the rest of an eval run: a sandbox started
    # ahead does it before it waits (every run in job mode does: they must not differ).
    import _ast  # noqa: F401
    import gc

    # The collection at exit would walk every object of the interpreter's start-up
    # (more than half of a small run's exit time); those stay alive to the end anyway.
    gc.freeze()

    try:  # noqa: SIM105  (contextlib is not loaded: keep start-up lean)
        os.write(fd, b".")
    except OSError:
        pass  # the server does not care (it sent the job at once) or is gone (read says)
    fields = _read_job(fd).decode("utf-8", "surrogateescape").split("\0")
    os.close(fd)  # before any code of the program: it never sees the socket
    count = int(fields[0])
    os.environ.clear()  # unsetenv() each: the C environment too, for what the program starts
    for item in fields[1 + count :]:
        key, _, value = item.partition("=")
        os.environ[key] = value
    return fields[1 : 1 + count]


def _read_job(fd: int) -> bytes:
    """``<length>\\n<body>``; the socket closing first means the sandbox is being discarded."""
    data = b""
    while b"\n" not in data:
        data += _read_some(fd, 4096)
    size, _, body = data.partition(b"\n")
    while len(body) < int(size):
        body += _read_some(fd, int(size) - len(body))
    return body


def _read_some(fd: int, count: int) -> bytes:
    chunk = os.read(fd, count)
    if not chunk:
        raise SystemExit(125)
    return chunk


# --- the report channel ---------------------------------------------------------------


_channel: tuple[int, int, tuple[int, int] | None] | None = None  # (pid, fd, identity)


def _open_channel(fd: int) -> None:
    """Write ``_report`` to ``fd`` at exit, from this process only, if ``fd`` is still ours."""
    try:
        os.set_inheritable(fd, False)  # programs the user starts never see it
        identity = _identity(fd)
    except OSError:
        return
    pid = os.getpid()
    global _channel
    _channel = (pid, fd, identity)

    def write() -> None:
        if os.getpid() != pid or _identity(fd) != identity:
            return  # a forked child, or the program closed the fd and reused the number
        fields = ", ".join(f"{_json(key)}: {_json(value)}" for key, value in _report.items())
        # The leading newline ends any partial line the program itself wrote there; a lone
        # surrogate becomes its JSON escape.
        line = f"\n{{{fields}}}\n".encode("utf-8", "backslashreplace")
        try:
            while line:
                line = line[os.write(fd, line) :]
        except OSError:
            pass

    atexit.register(write)


_JSON_ESCAPES = {**{c: f"\\u{c:04x}" for c in range(32)}, ord('"'): '\\"', ord("\\"): "\\\\"}


def _json(value: object) -> str:
    """JSON for the report's values: str, int, None."""
    if value is None:
        return "null"
    if isinstance(value, int):
        return str(value)
    return f'"{str(value).translate(_JSON_ESCAPES)}"'


def _identity(fd: int) -> tuple[int, int] | None:
    try:
        st = os.fstat(fd)
    except OSError:
        return None
    return st.st_dev, st.st_ino


# --- environment and pre-commands -----------------------------------------------------


def _honour_environment() -> None:
    """``-I`` makes the interpreter ignore PYTHON* variables; honour the two the service sets."""
    if os.environ.get("PYTHONDONTWRITEBYTECODE"):
        sys.dont_write_bytecode = True
    if os.environ.get("PYTHONUNBUFFERED"):
        for name in ("stdout", "stderr"):
            stream = getattr(sys, name)
            if stream is not None:
                unbuffered = _unbuffered(stream)
                setattr(sys, name, unbuffered)
                setattr(sys, f"__{name}__", unbuffered)


def _unbuffered(stream: io.TextIOWrapper) -> io.TextIOWrapper:
    """The stream ``python -u`` would have made: text straight through to an unbuffered fd."""
    stream.flush()
    raw = io.FileIO(stream.fileno(), "wb", closefd=False)
    raw.name = stream.name
    text = io.TextIOWrapper(
        raw, encoding=stream.encoding, errors=stream.errors, newline="\n", write_through=True
    )
    setattr(text, "mode", "w")  # noqa: B010  (not a declared attribute; CPython sets it too)
    return text


def _run_pre_commands(commands: list[str]) -> None:
    if not commands:
        return
    import subprocess

    for index, command in enumerate(commands):
        _flush()
        try:
            code = subprocess.call(["sh", "-c", command], stdin=subprocess.DEVNULL)
        except OSError as exc:
            print(f"pre-command {index}: {exc}", file=sys.stderr)
            code = 127
        if code != 0:
            code = 128 - code if code < 0 else code  # killed by signal N: the shell's 128+N
            _report.update(pre_command_failed=index, exit_code=code)
            raise SystemExit(code)


# --- the entrypoint -------------------------------------------------------------------


def _run_entrypoint(path: str, args: list[str], eval_last_expr: bool, extra: list[str]) -> None:
    try:
        with open(path, "rb") as file:
            source = file.read()
    except OSError as exc:
        program = getattr(sys, "orig_argv", [sys.executable])[0]
        print(
            f"{program}: can't open file {path!r}: [Errno {exc.errno}] {exc.strerror}",
            file=sys.stderr,
        )
        raise SystemExit(2) from None
    try:
        body, last = _compile(source, path, eval_last_expr)
        namespace = _fresh_main(path, args, extra).__dict__
        exec(body, namespace)
        if last is not None:
            _set_result(eval(last, namespace))
    except SystemExit:
        raise  # the interpreter prints its code, if any, and exits with it
    except BaseException as exc:
        _fail(exc, path)
        raise  # the interpreter's own exit: status 1, or death by SIGINT after finalization


def _compile(
    source: bytes, path: str, eval_last_expr: bool
) -> tuple[types.CodeType, types.CodeType | None]:
    """Code for the module, and for its trailing expression when that is evaluated apart."""
    if not eval_last_expr:
        return compile(source, path, "exec", dont_inherit=True), None
    import _ast  # the node classes, without ast.py's imports

    # compile(), not ast.parse(): a SyntaxError must carry no Python frame but the user's.
    tree = compile(source, path, "exec", _ast.PyCF_ONLY_AST, dont_inherit=True)
    assert isinstance(tree, _ast.Module)
    last = tree.body[-1] if tree.body else None
    if not isinstance(last, _ast.Expr):
        return compile(tree, path, "exec", dont_inherit=True), None
    del tree.body[-1]
    body = compile(tree, path, "exec", dont_inherit=True)
    return body, compile(_ast.Expression(last.value), path, "eval", dont_inherit=True)


def _fresh_main(path: str, args: list[str], extra: list[str]) -> types.ModuleType:
    """A ``__main__`` with what the interpreter gives a script, and the script's sys state."""
    module = types.ModuleType("__main__")
    module.__dict__.update(
        __annotations__={}, __builtins__=builtins, __file__=path, __cached__=None
    )
    module.__loader__ = SourceFileLoader("__main__", path)
    sys.modules["__main__"] = module
    sys.argv = [path, *args]
    if hasattr(sys, "orig_argv"):  # 3.10+
        sys.orig_argv = [sys.orig_argv[0], path, *args]
    sys.path.insert(0, os.path.dirname(os.path.realpath(path)))
    _add_site_dirs(extra)
    return module


def _add_site_dirs(dirs: list[str]) -> None:
    """Requirement environments go before the interpreter's site-packages (after the stdlib,
    which they must not shadow), with their ``.pth`` files processed as a venv's would be."""
    if not dirs:
        return
    import site

    before = len(sys.path)
    for path in dirs:
        site.addsitedir(path)
    added = sys.path[before:]
    del sys.path[before:]
    site_packages = set(site.getsitepackages())
    at = next((i for i, p in enumerate(sys.path) if p in site_packages), len(sys.path))
    sys.path[at:at] = added


def _set_result(value: object) -> None:
    if value is None:
        return
    try:
        text = repr(value)
    except Exception as exc:
        text = f"<repr failed: {_type_name(type(exc))}: {_describe(exc)}>"
    if len(text) > _RESULT_MAX_CHARS:
        text = f"{text[:_RESULT_MAX_CHARS]}... [{len(text) - _RESULT_MAX_CHARS} more characters]"
    _report["result"] = text


# --- uncaught exceptions --------------------------------------------------------------


def _fail(exc: BaseException, path: str) -> None:
    """Print ``exc`` as the interpreter would, without our frames, and record it."""
    tb = exc.__traceback__ = _without_ours(exc.__traceback__)  # what the default hook prints
    _report.update(error_type=_type_name(type(exc)), error_line=_error_line(exc, tb, path))
    _flush()  # as the interpreter does before printing a traceback
    _excepthook(exc, tb)
    sys.excepthook = _already_printed


def _excepthook(exc: BaseException, tb: types.TracebackType | None) -> None:
    hook = getattr(sys, "excepthook", None)
    if hook is None:
        print("sys.excepthook is missing", file=sys.stderr)
        hook = sys.__excepthook__
    try:
        hook(type(exc), exc, tb)
    except BaseException as hook_error:
        print("Error in sys.excepthook:", file=sys.stderr)
        hook_tb = hook_error.__traceback__ = _without_ours(hook_error.__traceback__)
        if hook_error.__context__ is exc:
            hook_error.__context__ = None  # not raised while handling it, for the interpreter
        sys.__excepthook__(type(hook_error), hook_error, hook_tb)
        print("\nOriginal exception was:", file=sys.stderr)
        sys.__excepthook__(type(exc), exc, tb)


def _without_ours(tb: types.TracebackType | None) -> types.TracebackType | None:
    while tb is not None and tb.tb_frame.f_globals is globals():
        tb = tb.tb_next
    return tb


def _already_printed(*_: object) -> None:
    pass


def _error_line(exc: BaseException, tb: types.TracebackType | None, path: str) -> int | None:
    """The entrypoint's line: where its SyntaxError is, else its innermost traceback frame."""
    if isinstance(exc, SyntaxError) and exc.filename == path and exc.lineno:
        return exc.lineno
    line = None
    while tb is not None:
        if tb.tb_frame.f_code.co_filename == path and isinstance(tb.tb_lineno, int):
            line = tb.tb_lineno
        tb = tb.tb_next
    return line


def _flush() -> None:
    for stream in (sys.stderr, sys.stdout):
        try:  # noqa: SIM105  (contextlib is not loaded yet: keep start-up lean)
            stream.flush()
        except Exception:
            pass


def _type_name(cls: type) -> str:
    module, name = getattr(cls, "__module__", None), cls.__qualname__
    return name if module in (None, "builtins", "__main__") else f"{module}.{name}"


def _describe(exc: BaseException) -> str:
    try:
        return str(exc)
    except Exception:
        return "<unprintable>"


if __name__ == "__main__":
    main()
