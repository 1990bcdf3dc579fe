"""Requirements guessed from the imports of submitted code (``/api/v1/eval``).

Imports are read with ``ast`` (the code is never run). Dropped: standard
library modules of the *target* Python, modules of the submission itself,
relative imports. What is left is mapped through the curated table in
``import_map``; an import the table does not know is skipped, so the program
sees its own ``ModuleNotFoundError`` instead of a failed install.

Usage::

    detected = detect_requirements({"main.py": "import yaml"}, python_version="3.12")
    merge_requirements(parse_requirements("PyYAML==6.0.2"), detected)   # ('pyyaml==6.0.2',)
"""

from __future__ import annotations

import ast
import functools
import sys
from collections.abc import Iterator, Mapping, Sequence
from pathlib import PurePosixPath

from packaging.utils import canonicalize_name

from .import_map import lookup
from .requirements import normalize_requirement, parse_requirements, requirement_name

# ``sys.stdlib_module_names`` is the server's own Python's; these adjust it to the
# target version (public top-level modules only: private ones are never in the table).
_REMOVED_IN: dict[tuple[int, int], frozenset[str]] = {
    (3, 12): frozenset({"asynchat", "asyncore", "distutils", "imp", "smtpd"}),
    (3, 13): frozenset(
        {
            "aifc", "audioop", "cgi", "cgitb", "chunk", "crypt", "imghdr", "lib2to3",
            "mailcap", "msilib", "nis", "nntplib", "ossaudiodev", "pipes", "sndhdr",
            "spwd", "sunau", "telnetlib", "uu", "xdrlib",
        }
    ),
}  # fmt: skip
_ADDED_IN: dict[tuple[int, int], frozenset[str]] = {
    (3, 11): frozenset({"tomllib"}),
    (3, 14): frozenset({"annotationlib", "compression"}),
}
_SOURCE_SUFFIXES = (".py", ".pyw")


def detect_requirements(sources: Mapping[str, str], *, python_version: str) -> tuple[str, ...]:
    """Normalized PyPI names for the imports of ``sources`` ({relative path: code})."""
    if not any("import" in code for code in sources.values()):
        return ()  # (most evals: nothing to parse, nor to look up)
    skip = stdlib_module_names(python_version) | local_module_names(sources)
    found: set[str] = set()
    for path, code in sources.items():
        if not path.endswith(_SOURCE_SUFFIXES):
            continue
        for module in imported_modules(code):
            if module.split(".")[0] in skip:
                continue
            project = lookup(module)
            if project is not None:
                found.add(canonicalize_name(project))
    return tuple(sorted(found))


def merge_requirements(explicit: Sequence[str], detected: Sequence[str]) -> tuple[str, ...]:
    """Explicit requirements plus the detected ones whose project is not named explicitly."""
    named = {requirement_name(r) for r in explicit}
    merged = {normalize_requirement(r) for r in explicit}
    merged |= {normalize_requirement(d) for d in detected if requirement_name(d) not in named}
    return tuple(sorted(merged))


def requirements_for_run(
    requirements_txt: str | None,
    sources: Mapping[str, str],
    *,
    python_version: str,
    auto_detect: bool,
) -> tuple[str, ...]:
    """What one run needs: the explicit lines, plus detected imports when ``auto_detect``."""
    explicit = parse_requirements(requirements_txt or "")
    if not auto_detect:
        return explicit
    return merge_requirements(explicit, detect_requirements(sources, python_version=python_version))


def imported_modules(code: str) -> Iterator[str]:
    """Absolute module names imported by ``code``; nothing if it does not parse.

    ``from a.b import c`` yields ``a.b.c`` (it may be a module); literal
    ``importlib.import_module("x")`` / ``__import__("x")`` calls count too.
    """
    try:
        tree = ast.parse(code)
    except (SyntaxError, ValueError):
        return
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield node.module
            yield from (f"{node.module}.{a.name}" for a in node.names if a.name != "*")
        elif isinstance(node, ast.Call) and (literal := _dynamic_import(node)):
            yield literal


def local_module_names(sources: Mapping[str, str]) -> frozenset[str]:
    """Names a submitted file could be imported as: every source file's stem and
    every directory on the way to one (any of them may end up on ``sys.path``)."""
    names: set[str] = set()
    for path in sources:
        pure = PurePosixPath(path)
        if pure.suffix in _SOURCE_SUFFIXES:
            names.add(pure.stem)
            names.update(pure.parent.parts)
    return frozenset(names)


@functools.cache  # every eval run asks, for one of a few versions
def stdlib_module_names(python_version: str) -> frozenset[str]:
    """Top-level standard library modules of Python ``python_version`` ("3.12")."""
    target = _version_tuple(python_version)
    names = set(sys.stdlib_module_names)
    for version, modules in _REMOVED_IN.items():
        names = names - modules if target >= version else names | modules
    for version, modules in _ADDED_IN.items():
        names = names | modules if target >= version else names - modules
    return frozenset(names)


def _dynamic_import(call: ast.Call) -> str | None:
    func = call.func
    is_dynamic = (isinstance(func, ast.Name) and func.id == "__import__") or (
        isinstance(func, ast.Attribute)
        and func.attr == "import_module"
        and isinstance(func.value, ast.Name)
        and func.value.id == "importlib"
    )
    if not is_dynamic or not call.args:
        return None
    first = call.args[0]
    if isinstance(first, ast.Constant) and isinstance(first.value, str):
        return first.value if first.value and not first.value.startswith(".") else None
    return None


def _version_tuple(version: str) -> tuple[int, int]:
    major, minor = version.split(".")[:2]
    return int(major), int(minor)
