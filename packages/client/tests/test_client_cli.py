"""The ``python-executor`` command as a real process against a real server."""

from __future__ import annotations

import io
import json
import os
import pty
import re
import subprocess
import sys
import tarfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

Cli = Callable[..., Any]
ID = re.compile(r"^exe_[0-9a-f-]{36}$")
ARGV = "import json, sys; print(json.dumps(sys.argv[1:]))\n"


def _one_clean_line(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert "Traceback" not in stderr
    return lines[0]


def test_stdin_is_main_py(cli: Cli, server_url: str) -> None:
    done = cli(
        "--server", server_url, "run", stdin=b"import sys\nprint(sys.argv[0].split('/')[-1])\n"
    )
    assert (done.returncode, done.stdout) == (0, "main.py\n")


def test_single_py_file(cli: Cli, server_url: str, tmp_path: Path) -> None:
    (tmp_path / "hello.py").write_text("print('hello file')\n")
    done = cli("run", "hello.py", "--server", server_url, cwd=tmp_path)
    assert (done.returncode, done.stdout) == (0, "hello file\n")


def test_directory(cli: Cli, server_url: str, tmp_path: Path) -> None:
    (tmp_path / "proj" / "lib").mkdir(parents=True)
    (tmp_path / "proj" / "lib" / "util.py").write_text("WORD = 'dir'\n")
    (tmp_path / "proj" / "__main__.py").write_text("from lib.util import WORD; print(WORD)\n")
    done = cli("--server", server_url, "run", str(tmp_path / "proj"))
    assert (done.returncode, done.stdout) == (0, "dir\n")


def test_tar_file(cli: Cli, server_url: str, tmp_path: Path) -> None:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        data = b"print('from tar')\n"
        info = tarfile.TarInfo("main.py")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    (tmp_path / "code.tar").write_bytes(buffer.getvalue())
    done = cli("--server", server_url, "run", "code.tar", cwd=tmp_path)
    assert (done.returncode, done.stdout) == (0, "from tar\n")


def test_repeated_file_flags_keep_relative_paths(cli: Cli, server_url: str, tmp_path: Path) -> None:
    (tmp_path / "lib").mkdir()
    (tmp_path / "lib" / "util.py").write_text("WORD = 'kept'\n")
    (tmp_path / "main.py").write_text(
        "import os\nfrom lib.util import WORD\nprint(WORD, sorted(os.listdir('lib')))\n"
    )
    (tmp_path / "ignored.py").write_text("print('wrong input')\n")
    done = cli(
        "--server", server_url, "run", "--file", "main.py", "--file", "lib/util.py", "ignored.py",
        cwd=tmp_path,
    )  # fmt: skip
    assert (done.returncode, done.stdout) == (0, "kept ['util.py']\n")
    assert "ignoring ignored.py" in done.stderr


def test_exit_code_and_streams_propagate(cli: Cli, server_url: str) -> None:
    code = b"import sys\nprint('out')\nprint('err', file=sys.stderr)\nsys.exit(3)\n"
    done = cli("--server", server_url, "run", stdin=code)
    assert (done.returncode, done.stdout, done.stderr) == (3, "out\n", "err\n")
    crashed = cli("--server", server_url, "run", stdin=b"1 / 0\n")
    assert crashed.returncode == 1 and "ZeroDivisionError" in crashed.stderr


def test_script_args_after_double_dash(cli: Cli, server_url: str, tmp_path: Path) -> None:
    (tmp_path / "args.py").write_text(ARGV)
    done = cli(
        "--server", server_url, "run", "args.py", "--", "a b", "--flag", "--", "-v", cwd=tmp_path
    )
    assert json.loads(done.stdout) == ["a b", "--flag", "--", "-v"]
    piped = cli("--server", server_url, "run", "--", "x y", stdin=ARGV.encode())
    assert json.loads(piped.stdout) == ["x y"]


def test_env_from_local_environment_and_explicit(cli: Cli, server_url: str) -> None:
    code = b"import os\nprint(os.environ['FROM_HERE'], os.environ['GIVEN'])\n"
    done = cli(
        "--server", server_url, "run", "-e", "FROM_HERE", "--env", "GIVEN=a=b c",
        stdin=code, env={"FROM_HERE": "local value"},
    )  # fmt: skip
    assert (done.returncode, done.stdout) == (0, "local value a=b c\n")


def test_env_missing_locally_is_a_usage_error(cli: Cli, server_url: str) -> None:
    done = cli("--server", server_url, "run", "-e", "SURELY_NOT_SET_ANYWHERE", stdin=b"pass\n")
    assert done.returncode == 2 and "SURELY_NOT_SET_ANYWHERE" in _one_clean_line(done.stderr)


def test_other_flags_reach_the_server(cli: Cli, server_url: str, tmp_path: Path) -> None:
    (tmp_path / "in.txt").write_text("fed\n")
    code = b"print(input(), open('pre.txt').read().strip())\n"
    done = cli(
        "--server", server_url, "run", "--stdin-file", str(tmp_path / "in.txt"),
        "--timeout", "30", "--memory", "512", "--disk", "256", "--cpu", "512",
        "--pre", "echo pre-command > pre.txt", stdin=code,
    )  # fmt: skip
    assert (done.returncode, done.stdout) == (0, "fed pre-command\n")


def test_timeout_exits_124_with_the_reason(cli: Cli, server_url: str) -> None:
    done = cli(
        "--server", server_url, "run", "--timeout", "1", stdin=b"import time; time.sleep(30)"
    )
    assert done.returncode == 124 and "timed out" in done.stderr


def test_unreachable_server_is_one_line(cli: Cli, closed_url: str) -> None:
    done = cli("--server", closed_url, "run", stdin=b"print(1)\n")
    assert done.returncode == 125 and closed_url in _one_clean_line(done.stderr)
    assert done.stdout == ""


def test_server_error_is_one_line_with_its_message(cli: Cli, server_url: str) -> None:
    done = cli("--server", server_url, "run", "--python", "2.7", stdin=b"print(1)\n")
    assert done.returncode == 125 and "2.7" in _one_clean_line(done.stderr)
    missing = cli("--server", server_url, "logs", "exe_00000000-0000-4000-8000-000000000000")
    assert missing.returncode == 125 and "404" in _one_clean_line(missing.stderr)


def test_missing_input_file_is_a_usage_error(cli: Cli, server_url: str, tmp_path: Path) -> None:
    done = cli("--server", server_url, "run", "nope.py", cwd=tmp_path)
    assert done.returncode == 2 and "nope.py" in _one_clean_line(done.stderr)
    (tmp_path / "code.tar.gz").write_bytes(b"\x1f\x8b")
    packed = cli("--server", server_url, "run", "code.tar.gz", cwd=tmp_path)
    assert packed.returncode == 2 and "uncompressed" in _one_clean_line(packed.stderr)
    empty = cli("--server", server_url, "run", stdin=b"  \n")
    assert empty.returncode == 2 and "empty" in _one_clean_line(empty.stderr)


def test_server_option_anywhere_and_from_the_environment(
    cli: Cli, server_url: str, closed_url: str
) -> None:
    after = cli("run", "--server", server_url, stdin=b"print('after')")
    env = cli("run", stdin=b"print('env')", env={"PYEXEC_SERVER": server_url})
    wins = cli("--server", closed_url, "run", "--server", server_url, stdin=b"print('wins')")
    assert (after.stdout, env.stdout, wins.stdout) == ("after\n", "env\n", "wins\n")


def test_quiet_and_verbose(cli: Cli, server_url: str) -> None:
    code = b"import sys\nprint('out')\nprint('err', file=sys.stderr)\n"
    quiet = cli("-q", "--server", server_url, "run", stdin=code)
    assert (quiet.stdout, quiet.stderr) == ("out\n", "")
    verbose = cli("--server", server_url, "run", "-v", stdin=code)
    assert verbose.stdout == "out\n" and re.search(r"execution\s+exe_", verbose.stderr)
    assert re.search(r"status\s+completed", verbose.stderr)


def test_submit_prints_only_the_id_then_follow(cli: Cli, server_url: str) -> None:
    code = b"import sys, time\nprint('a', flush=True)\ntime.sleep(1)\nprint('b')\nsys.exit(5)\n"
    submitted = cli("--server", server_url, "submit", stdin=code)
    assert submitted.returncode == 0 and ID.match(submitted.stdout.strip())
    assert submitted.stdout.count("\n") == 1 and submitted.stderr == ""
    followed = cli("--server", server_url, "follow", submitted.stdout.strip())
    assert (followed.returncode, followed.stdout) == (5, "a\nb\n")


def test_run_async_is_submit(cli: Cli, server_url: str) -> None:
    done = cli("--server", server_url, "run", "--async", stdin=b"print(1)")
    assert done.returncode == 0 and ID.match(done.stdout.strip())


def test_kill_then_follow_and_logs(cli: Cli, server_url: str) -> None:
    code = b"import time\nprint('working', flush=True)\ntime.sleep(60)\n"
    execution_id = cli("--server", server_url, "submit", stdin=code).stdout.strip()
    killed = cli("--server", server_url, "kill", execution_id)
    assert killed.returncode == 0 and "killed" in killed.stdout
    followed = cli("--server", server_url, "follow", execution_id)
    assert followed.returncode == 137 and "killed" in followed.stderr
    again = cli("--server", server_url, "kill", execution_id)
    assert again.returncode == 0 and "killed" in again.stdout  # idempotent


def test_logs_of_a_finished_run(cli: Cli, server_url: str) -> None:
    code = b"import sys\nprint('logged')\nprint('warned', file=sys.stderr)\nsys.exit(2)\n"
    execution_id = cli("--server", server_url, "submit", stdin=code).stdout.strip()
    cli("--server", server_url, "follow", execution_id)
    logs = cli("--server", server_url, "logs", execution_id)
    assert (logs.returncode, logs.stdout, logs.stderr) == (0, "logged\n", "warned\n")


def test_eval(cli: Cli, server_url: str) -> None:
    done = cli("--server", server_url, "eval", "print('side')\n2 + 2")
    assert (done.returncode, done.stdout) == (0, "side\n4\n")
    piped = cli("--server", server_url, "eval", "-q", stdin=b"print('hidden')\n'value'")
    assert piped.stdout == "'value'\n"
    plain = cli("--server", server_url, "eval", "--no-result", "print('only'); 42")
    assert plain.stdout == "only\n"
    args = cli("--server", server_url, "eval", "import sys; sys.argv[1:]", "--", "a b")
    assert args.stdout == "['a b']\n"


def test_list(cli: Cli, server_url: str) -> None:
    execution_id = cli("--server", server_url, "submit", stdin=b"pass").stdout.strip()
    table = cli("--server", server_url, "list", "--limit", "100")
    assert (
        table.returncode == 0
        and table.stdout.startswith("EXECUTION ID")
        and execution_id in table.stdout
    )
    ids = cli("--server", server_url, "list", "-q", "--limit", "100").stdout.split()
    assert execution_id in ids and all(ID.match(i) for i in ids)


def test_version(cli: Cli, server_url: str) -> None:
    assert re.match(r"python-executor-client \d", cli("version").stdout)
    verbose = cli("--server", server_url, "-v", "version")
    assert verbose.returncode == 0 and "status=ok" in verbose.stdout


@pytest.mark.parametrize(
    "command", ["run", "submit", "follow", "logs", "kill", "eval", "list", "version"]
)
def test_every_command_has_help_with_examples(cli: Cli, command: str) -> None:
    done = cli(command, "--help")
    assert done.returncode == 0 and "Examples" in done.stdout and "python-executor" in done.stdout


def test_progress_bar_only_when_stderr_is_a_terminal(
    cli: Cli, server_url: str, tmp_path: Path
) -> None:
    (tmp_path / "main.py").write_text("print('big')\n")
    (tmp_path / "blob.bin").write_bytes(os.urandom(6 * 1024 * 1024))
    piped = cli("--server", server_url, "run", str(tmp_path))
    assert (piped.stdout, piped.stderr) == ("big\n", "")
    primary, secondary = pty.openpty()
    proc = subprocess.Popen(
        [str(Path(sys.executable).with_name("python-executor")), "--server", server_url,
         "run", str(tmp_path)],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=secondary,
    )  # fmt: skip
    os.close(secondary)
    terminal = _read_all(primary)
    assert proc.communicate(timeout=60)[0] == b"big\n" and proc.returncode == 0
    assert b"uploading" in terminal


def _read_all(fd: int) -> bytes:
    chunks = []
    while True:
        try:
            chunk = os.read(fd, 4096)
        except OSError:  # EIO: the other side is closed
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(fd)
    return b"".join(chunks)
