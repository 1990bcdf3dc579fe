"""The eval driver, run for real by every interpreter found here, in a tmp dir for /work.

Where the interpreter itself defines the behaviour (tracebacks, exit codes, globals,
threads, atexit, stdio), the driver's run is compared with ``python main.py``'s.
"""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest
from python_executor_server.execution.driver import (
    DriverReport,
    driver_argv,
    parse_report,
    parse_traceback,
)
from python_executor_server.execution.interpreters import discover_interpreters
from python_executor_server.sandbox.base import end_code
from python_executor_server.settings import Settings

INTERPRETERS = discover_interpreters(Settings())
ENV = {"PATH": os.environ["PATH"], "LANG": "C.UTF-8", "PYTHONDONTWRITEBYTECODE": "1"}
UNBUFFERED = {**ENV, "PYTHONUNBUFFERED": "1"}  # what the service sets
VERSIONS = {str(i.executable): version for version, i in INTERPRETERS.items()}


@pytest.fixture(params=list(VERSIONS), ids=list(INTERPRETERS))
def python(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@dataclass
class Run:
    code: int
    stdout: str
    stderr: str
    side_channel: bytes = b""

    @property
    def output(self) -> tuple[int, str, str]:
        return self.code, self.stdout, self.stderr

    @property
    def report(self) -> DriverReport:
        return parse_report(self.side_channel)


def write(workdir: Path, source: str, files: dict[str, str] | None = None) -> Path:
    for name, text in {**(files or {}), "main.py": source}.items():
        (workdir / name).parent.mkdir(parents=True, exist_ok=True)
        (workdir / name).write_text(text, encoding="utf-8")
    return workdir / "main.py"


def drive(
    python: str,
    workdir: Path,
    source: str,
    *,
    files: dict[str, str] | None = None,
    eval_last_expr: bool = False,
    args: tuple[str, ...] = (),
    stdin: str = "",
    pre_commands: tuple[str, ...] = (),
    extra_paths: tuple[str, ...] = (),
    env: dict[str, str] = UNBUFFERED,
) -> Run:
    """Run ``source`` as main.py through the driver; ``RESULT_FD`` in it is the report fd."""
    read_end, write_end = os.pipe()
    with os.fdopen(read_end, "rb") as side:
        try:
            main = write(workdir, source.replace("RESULT_FD", str(write_end)), files)
            argv = driver_argv(
                python,
                entrypoint=str(main),
                args=args,
                eval_last_expr=eval_last_expr,
                pre_commands=pre_commands,
                result_fd=write_end,
                extra_paths=extra_paths,
            )
            proc = subprocess.run(
                argv,
                cwd=workdir,
                input=stdin.encode(),
                capture_output=True,
                pass_fds=(write_end,),
                env=env,
                timeout=60,
            )
        finally:
            os.close(write_end)
        return Run(proc.returncode, proc.stdout.decode(), proc.stderr.decode(), side.read())


def reference(
    python: str, workdir: Path, *, args: tuple[str, ...] = (), env: dict[str, str] = UNBUFFERED
) -> Run:
    """``python main.py`` itself, on the program ``drive`` just wrote."""
    main = str(workdir / "main.py")
    proc = subprocess.run(
        [python, "-s", main, *args], cwd=workdir, capture_output=True, env=env, timeout=60
    )
    return Run(proc.returncode, proc.stdout.decode(), proc.stderr.decode())


# --- same behaviour as the interpreter ------------------------------------------------

SAME_AS_PYTHON = {
    "name_error": "x = 1\n\nprint(x)\nundefined\n",
    "syntax_error": "x = 1\nif x\n    pass\n",
    "indentation_error": "if True:\npass\n",
    "chained": "try:\n    {}['k']\nexcept KeyError as e:\n    raise ValueError('bad') from e\n",
    "exit_message": "import sys\nsys.exit('bye')\n",
    "exit_none": "raise SystemExit\n",
    "exit_3": "import sys\nsys.exit(3)\n",
    "keyboard_interrupt": "print('before')\nraise KeyboardInterrupt\n",
    "custom_excepthook": "import sys\nsys.excepthook = lambda *exc: print('hook', exc[1])\n1/0\n",
    "failing_excepthook": "import sys\nsys.excepthook = lambda *exc: 1/0\n[][0]\n",
    "no_excepthook": "import sys\ndel sys.excepthook\n[][0]\n",
    "globals": (
        "import sys\n"
        "print(list(globals()), __name__, __file__, __doc__, __package__, __spec__, __cached__)\n"
        "print(type(__loader__).__name__, __loader__.name, __loader__.path, __builtins__)\n"
        "print(sys.argv, sys.orig_argv[-len(sys.argv):], sys.path[0], sys.dont_write_bytecode)\n"
        "import inspect; print(inspect.getsourcefile(sys.modules['__main__']))\n"
    ),
    "exit_float": "raise SystemExit(2.5)\n",
    "exit_negative": "import sys\nsys.exit(-1)\n",
    "exit_huge": "import sys\nsys.exit(2 ** 70)\n",
    "stdout_closed": "import sys\nprint('x')\nsys.stdout.close()\n",
    "finalizer_at_exit": (
        "class A:\n"
        "    def __del__(self):\n"
        "        print('finalized', flush=True)\n"
        "a = A()\n"
        "print('end')\n"
    ),
    "threads_and_atexit": (
        "import atexit, threading, time\n"
        "atexit.register(print, 'atexit ran')\n"
        "threading.Thread(target=lambda: (time.sleep(0.3), print('thread done'))).start()\n"
        "print('main done')\n"
        "raise RuntimeError('main failed')\n"
    ),
}


@pytest.mark.parametrize("eval_last_expr", [False, True], ids=["exec", "eval"])
@pytest.mark.parametrize("source", SAME_AS_PYTHON.values(), ids=SAME_AS_PYTHON.keys())
def test_runs_like_the_interpreter(
    python: str, tmp_path: Path, source: str, eval_last_expr: bool
) -> None:
    run = drive(python, tmp_path, source, eval_last_expr=eval_last_expr, args=("a b", "c"))
    assert run.output == reference(python, tmp_path, args=("a b", "c")).output
    report = run.side_channel.removesuffix(b"\nexit %d\n" % run.code)
    assert report.endswith(b"}\n")  # the report is written, even after atexit


# --- the end line: the exit code, said before the exit -----------------------------------

# (source, exit code, whether the driver says it): no end line where the code could
# still change after the driver's last word.
END_LINE = {
    "plain": ("print('x')\n", 0, True),
    "exit_3": ("import sys\nsys.exit(3)\n", 3, True),
    "exit_256": ("import sys\nsys.exit(256)\n", 0, True),  # as the kernel keeps it: the low byte
    "exit_negative": ("import sys\nsys.exit(-1)\n", 255, True),
    "exception": ("1/0\n", 1, True),
    "stdout_closed": ("import sys\nprint('x')\nsys.stdout.close()\n", 0, True),
    "threads_joined": ("import threading\nthreading.Thread(target=print).start()\n", 0, True),
    # Another thread could still end the process with another code.
    "daemon_thread": (
        "import threading, time\n"
        "threading.Thread(target=time.sleep, args=(5,), daemon=True).start()\n"
        "raise SystemExit(4)\n",
        4,
        False,
    ),
    "os_exit": ("import os\nprint('x', flush=True)\nos._exit(5)\n", 5, False),
    # A finalizer that ends the process while the program's globals are dropped.
    "exit_in_finalizer": (
        "import os\nclass A:\n    def __del__(self, end=os._exit):\n        end(7)\na = A()\n",
        7,
        False,
    ),
    "killed": ("import os, signal\nos.kill(os.getpid(), signal.SIGKILL)\n", -9, False),
    "channel_closed": ("import os\nos.close(RESULT_FD)\n", 0, False),
}


@pytest.mark.parametrize("case", END_LINE.values(), ids=END_LINE.keys())
def test_the_driver_says_its_exit_code_last(
    python: str, tmp_path: Path, case: tuple[str, int, bool]
) -> None:
    """``exit N`` after the report: the code the process exits with; base.end_code reads it."""
    code, expected, said = case
    run = drive(python, tmp_path, code)
    assert run.code == expected
    if not said:
        assert end_code(run.side_channel) is None
        return
    assert run.side_channel.endswith(b"}\n\nexit %d\n" % expected)
    assert end_code(run.side_channel) == expected
    assert run.report == parse_report(run.side_channel.removesuffix(b"\nexit %d\n" % expected))


def test_a_forked_child_of_the_program_says_no_end(python: str, tmp_path: Path) -> None:
    """Only the driver's own process says the end: a child the program forked that runs
    on to the driver's exit does not (its parent is not done)."""
    code = (
        "import os, sys\n"
        "if os.fork() == 0:\n"
        "    sys.exit(6)\n"  # the child leaves through the driver's exit
        "os.wait()\n"
        "sys.exit(2)\n"
    )
    run = drive(python, tmp_path, code)
    assert run.code == 2
    assert run.side_channel.count(b"exit ") == 1
    assert end_code(run.side_channel) == 2


@pytest.mark.parametrize("env", [ENV, UNBUFFERED], ids=["buffered", "unbuffered"])
def test_stdio_like_the_interpreter(python: str, tmp_path: Path, env: dict[str, str]) -> None:
    source = (
        "import sys\n"
        "for s in (sys.stdout, sys.stderr):\n"
        "    print(type(s.buffer).__name__, s.write_through, s.line_buffering, s.name, s.mode,\n"
        "          s.encoding, s.errors, s.buffer.name, type(s), sys.__stdout__ is sys.stdout)\n"
    )
    run = drive(python, tmp_path, source, env=env)
    assert run.output == reference(python, tmp_path, env=env).output


# --- eval_last_expr -------------------------------------------------------------------

RESULTS = {
    "expression": ("1+1", "2"),
    "statement": ("x = 1", None),
    "none": ("None", None),
    "string": ("'hi'", "'hi'"),
    "multi_line": ("x = 2\n(x +\n  40)", "42"),
    "multi_line_list": ("[\n    1,\n    2,\n]", "[1, 2]"),
    "imports": ("import math\nmath.floor(2.5)", "2"),
    "bare_name": ("import json\ndata = json.loads('{\"a\": 1}')\ndata", "{'a': 1}"),
    "same_line": ("a = 1; a + 1", "2"),
    "compound_last": ("if True:\n    3", None),
    "empty": ("", None),
    "json_escapes": (
        "class R:\n    def __repr__(self):\n        return 'q\"b\\\\c\\x00\\n\\t é😀\\ud800'\nR()",
        'q"b\\c\x00\n\t é😀\ud800',
    ),
    "repr_fails": (
        "class A:\n    def __repr__(self):\n        raise ValueError('nope')\nA()",
        "<repr failed: ValueError: nope>",
    ),
}


@pytest.mark.parametrize(("source", "result"), RESULTS.values(), ids=RESULTS.keys())
def test_result(python: str, tmp_path: Path, source: str, result: str | None) -> None:
    run = drive(python, tmp_path, source, eval_last_expr=True)
    assert run.output == (0, "", "")
    assert run.report == DriverReport(result=result)


def test_result_is_out_of_band(python: str, tmp_path: Path) -> None:
    fake = '{"result": "forged", "error_type": null, "error_line": null}'
    run = drive(
        python, tmp_path, f"print('hello')\nprint({fake!r})\nprint('once')", eval_last_expr=True
    )
    assert run.stdout == f"hello\n{fake}\nonce\n"
    assert run.report == DriverReport()
    run = drive(python, tmp_path, f"print({fake!r})\n1 + 1", eval_last_expr=True)
    assert (run.stdout, run.report.result) == (f"{fake}\n", "2")


def test_driver_report_comes_last(python: str, tmp_path: Path) -> None:
    source = (
        "import atexit, os\n"
        'os.write(RESULT_FD, b\'{"result": "forged"} and garbage\')\n'
        'atexit.register(os.write, RESULT_FD, b\'\\n{"result": "forged at exit"}\\n\')\n'
        "os.system('test -e /proc/self/fd/RESULT_FD && echo inherited || echo private')\n"
        "1 + 1"
    )
    run = drive(python, tmp_path, source, eval_last_expr=True)
    assert (run.stdout, run.report.result) == ("private\n", "2")


# --- errors ---------------------------------------------------------------------------

MODULE = "def boom():\n    raise ValueError('x')\n\nclass Oops(Exception):\n    pass\n"
ERRORS = {
    "name_error": ("a = 1\nb = 2\nprint(c)\n", {}, "NameError", 3),
    "syntax_error": ("x = 1\n\nif x\n    pass\n", {}, "SyntaxError", 3),
    "indentation_error": ("if True:\nprint(1)\n", {}, "IndentationError", 2),
    "in_local_module": ("import mod\n\nmod.boom()\n", {"mod.py": MODULE}, "ValueError", 3),
    "local_module_type": ("import mod\nraise mod.Oops()\n", {"mod.py": MODULE}, "mod.Oops", 2),
    "syntax_in_module": ("\nimport bad\n", {"bad.py": "def (\n"}, "SyntaxError", 2),
    "dotted": ("import json\njson.loads('nope')\n", {}, "json.decoder.JSONDecodeError", 2),
    "main_class": ("class Oops(Exception):\n    pass\n\nraise Oops\n", {}, "Oops", 4),
    "local_class": (
        "def f():\n    class E(Exception):\n        pass\n    raise E\nf()\n",
        {},
        "f.<locals>.E",
        4,
    ),
    "chained": ("try:\n    1/0\nexcept Exception:\n    int('x')\n", {}, "ValueError", 4),
    "missing_module": ("\nimport no_such_module\n", {}, "ModuleNotFoundError", 2),
    "in_last_expr": ("x = 1\n\nx / 0", {}, "ZeroDivisionError", 3),
    "keyboard_interrupt": ("raise KeyboardInterrupt\n", {}, "KeyboardInterrupt", 1),
    "group": ("\nraise ExceptionGroup('g', [ValueError()])\n", {}, "ExceptionGroup", 2),
}


@pytest.mark.parametrize(("source", "files", "error_type", "line"), ERRORS.values(), ids=ERRORS)
@pytest.mark.parametrize("eval_last_expr", [False, True], ids=["exec", "eval"])
def test_error_type_and_line(
    python: str,
    tmp_path: Path,
    source: str,
    files: dict[str, str],
    error_type: str,
    line: int,
    eval_last_expr: bool,
) -> None:
    if error_type == "ExceptionGroup" and VERSIONS[python] == "3.10":
        error_type = "NameError"  # no exception groups before 3.11
    run = drive(python, tmp_path, source, files=files, eval_last_expr=eval_last_expr)
    assert run.code == (-2 if error_type == "KeyboardInterrupt" else 1)
    assert run.report == DriverReport(error_type=error_type, error_line=line)
    # The fallback for runs that leave no report reads the same from the real traceback.
    assert parse_traceback(reference(python, tmp_path).stderr, str(tmp_path / "main.py")) == (
        error_type,
        line,
    )


@pytest.mark.parametrize(("source", "code"), [("import sys\nsys.exit(3)", 3), ("exit('m')", 1)])
def test_exit_is_not_an_error(python: str, tmp_path: Path, source: str, code: int) -> None:
    run = drive(python, tmp_path, source, eval_last_expr=True)
    assert (run.code, run.report) == (code, DriverReport())


def test_files_of_project_modules_are_flushed_at_exit(python: str, tmp_path: Path) -> None:
    """The driver ends without tearing the interpreter down, but a file left open (and
    unflushed) in a module of the project is written out, as at the interpreter's exit."""
    helper = "f = open('out.txt', 'w')\nf.write('kept')\n"
    source = "import helper\nprint('done')\n"
    run = drive(python, tmp_path, source, files={"helper.py": helper})
    assert (tmp_path / "out.txt").read_text() == "kept"
    (tmp_path / "out.txt").unlink()
    assert run.output == reference(python, tmp_path).output
    assert (tmp_path / "out.txt").read_text() == "kept"


# --- the program's world --------------------------------------------------------------


def test_stdin_args_and_main_name(python: str, tmp_path: Path) -> None:
    source = (
        "import sys\n"
        "if __name__ == '__main__':\n"
        "    print(sys.argv[1:], sys.stdin.read().upper())\n"
    )
    args = ("a b", "", "--eval", "--")
    run = drive(python, tmp_path, source, args=args, stdin="abc", pre_commands=("cat",))
    assert run.stdout == "['a b', '', '--eval', '--'] ABC\n"


def test_missing_entrypoint_like_the_interpreter(python: str, tmp_path: Path) -> None:
    missing = str(tmp_path / "missing.py")
    argv = driver_argv(
        python, entrypoint=missing, args=(), eval_last_expr=False, pre_commands=(), result_fd=None
    )
    run = subprocess.run(argv, capture_output=True, env=ENV, timeout=60)
    expected = subprocess.run([python, missing], capture_output=True, env=ENV, timeout=60)
    assert (run.returncode, run.stdout, run.stderr) == (2, b"", expected.stderr)
    assert expected.returncode == 2


def test_classes_of_main_pickle_and_spawn(python: str, tmp_path: Path) -> None:
    source = (
        "import multiprocessing, pickle\n"
        "class Point:\n"
        "    def __init__(self, x):\n"
        "        self.x = x\n"
        "def square(p):\n"
        "    return p.x * p.x\n"
        "if __name__ == '__main__':\n"
        "    p = pickle.loads(pickle.dumps(Point(3)))\n"
        "    with multiprocessing.get_context('spawn').Pool(2) as pool:\n"
        "        print(type(p).__module__, p.x, pool.map(square, [Point(2), p]))\n"
    )
    run = drive(python, tmp_path, source)
    assert run.output == (0, "__main__ 3 [4, 9]\n", "")


def test_extra_paths_after_stdlib_with_pth_files(python: str, tmp_path: Path) -> None:
    env, more = tmp_path / "env", tmp_path / "more"
    env.mkdir()
    more.mkdir()
    (env / "extra_mod.py").write_text("X = 'env'")
    (env / "extra.pth").write_text(f"{more}\n")
    (more / "pth_mod.py").write_text("Y = 'pth'")
    source = (
        "import os, sys, extra_mod, pth_mod\n"
        f"at = sys.path.index({str(env)!r})\n"
        "print(extra_mod.X, pth_mod.Y, sys.path.index(os.path.dirname(os.__file__)) < at,\n"
        "      all(at < i for i, p in enumerate(sys.path) if p.endswith('site-packages')))\n"
    )
    run = drive(python, tmp_path / "work", source, extra_paths=(str(env),))
    assert (run.stdout, run.stderr) == ("env pth True True\n", "")


# --- pre-commands ---------------------------------------------------------------------


def test_pre_commands_run_in_order_before_the_program(python: str, tmp_path: Path) -> None:
    pre = ("echo one", "echo two >&2", "echo made > made.txt")
    run = drive(python, tmp_path, "print(open('made.txt').read(), end='')", pre_commands=pre)
    assert run.output == (0, "one\nmade\n", "two\n")
    assert run.report == DriverReport()


def test_failing_pre_command_ends_the_run(python: str, tmp_path: Path) -> None:
    pre = ("echo first", "echo oops >&2; exit 7", "echo never")
    run = drive(python, tmp_path, "print('program ran')", pre_commands=pre)
    assert run.output == (7, "first\n", "oops\n")
    assert run.report == DriverReport(pre_command_failed=1)


# --- host side, pure ------------------------------------------------------------------


def test_parse_report_last_valid_line_wins() -> None:
    good = b'{"result": "2", "error_type": null, "error_line": null, "pre_command_failed": null}'
    assert parse_report(good + b"\n") == DriverReport(result="2")
    assert parse_report(b"") == DriverReport()
    assert parse_report(b"\xff\x00garbage\n[1]\n" + good + b'\n{"result": 3}\n{"trunc') == (
        DriverReport(result="2")
    )
    assert parse_report(b'{"error_line": true}\n{"error_type": "E", "error_line": 4}') == (
        DriverReport(error_type="E", error_line=4)
    )


def test_parse_traceback_ignores_noise() -> None:
    stderr = (
        "Traceback (most recent call last):\n"
        '  File "/work/main.py", line 9, in <module>\n'
        "    go()\n"
        '  File "/work/lib.py", line 2, in go\n'
        "KeyError: 'k'\n"
        "\n"
        "During handling of the above exception, another exception occurred:\n"
        "\n"
        "Traceback (most recent call last):\n"
        '  File "/work/main.py", line 11, in <module>\n'
        "mod.Error: multi\n"
        "line message\n"
        "Error: printed by the program later\n"
    )
    assert parse_traceback(stderr, "/work/main.py") == ("mod.Error", 11)
    assert parse_traceback("Error: no traceback\n", "/work/main.py") == (None, None)


def test_driver_argv_needs_an_absolute_entrypoint() -> None:
    with pytest.raises(ValueError, match="absolute"):
        driver_argv(
            "/py", entrypoint="m.py", args=(), eval_last_expr=False, pre_commands=(), result_fd=3
        )
