"""`python-executor-server`: serve the API, or run a queue worker."""

from __future__ import annotations


def main() -> None:
    raise SystemExit("not yet")
