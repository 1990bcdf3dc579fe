"""The examples shown by ``--help`` (rich markup; paragraphs separated by blank lines)."""

from __future__ import annotations

MAIN = """[bold]Examples[/bold]

  echo 'print("hello")' | python-executor run

  python-executor --server http://pyexec:8080 run ./project -- -v "in 1.txt"

  ID=$(python-executor submit long_job.py) && python-executor follow $ID

Environment: PYEXEC_SERVER is the server URL (default http://localhost:8080).
"""

RUN = """[bold]Input[/bold], first match wins: --file (repeatable, keeps relative paths),
an explicit .tar, a directory, a single file, standard input (as main.py).
The entrypoint is main.py, else __main__.py, else the first .py file.

[bold]Exit code[/bold]: the program's own; 124 timed out, 137 killed, 1 other failure,
2 usage or local input error, 125 server unreachable or request refused.

[bold]Examples[/bold]

  python-executor run script.py -- --name "Ada Lovelace"

  echo 'import sys; print(sys.argv[1:])' | python-executor run -- a "b c"

  python-executor run ./project --timeout 30 --memory 512 -e API_KEY -e DEBUG=1

  python-executor run --file main.py --file lib/util.py --requirements req.txt

  python-executor run code.tar --python 3.12 --stdin-file input.txt
"""

SUBMIT = """Prints only the execution id, so it composes with the other commands.

[bold]Examples[/bold]

  ID=$(python-executor submit long_job.py --timeout 3600)

  python-executor follow "$ID"

  python-executor kill "$ID"
"""

FOLLOW = """Exits with the program's exit code (see run --help).

[bold]Examples[/bold]

  python-executor follow exe_550e8400-e29b-41d4-a716-446655440000

  python-executor follow -q "$ID" > output.txt
"""

LOGS = """[bold]Examples[/bold]

  python-executor logs "$ID"

  python-executor logs -v "$ID" 2> details.txt
"""

KILL = """Prints "killed", or the status the execution already had.

[bold]Examples[/bold]

  python-executor kill "$ID"
"""

EVAL = """Prints the program's output, then the value of the last expression.
Code comes from the argument or from standard input.

[bold]Examples[/bold]

  python-executor eval '2 + 2'

  python-executor eval 'import math
  math.sqrt(16)'

  echo 'import sys; sys.version' | python-executor eval --python 3.12

  python-executor eval --no-result 'print("hello"); 42'
"""

LIST = """[bold]Examples[/bold]

  python-executor list

  python-executor list --status running -q | xargs -n1 python-executor kill
"""

VERSION = """[bold]Examples[/bold]

  python-executor version

  python-executor -v version
"""
