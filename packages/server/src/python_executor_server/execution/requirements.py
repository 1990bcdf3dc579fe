"""Requirement lines: validated, normalized, hashed.

Only what names a package from the configured index is accepted: a name,
extras, version specifiers and an environment marker (PEP 508). Option lines
(``-i``, ``-e``, ``-r``, ``--hash`` ...), URLs, VCS references, direct
references (``name @ ...``) and local paths are refused: they would let a
request point the installer at a host file or an internal address.

Normalized form: the PEP 503 name, extras sorted and normalized, specifiers
sorted, the marker as ``packaging`` prints it::

    "PyYAML[B,a] <7, >=5 ; python_version>'3.8'"  ->  'pyyaml[a,b]<7,>=5; python_version > "3.8"'

Usage::

    requirements = parse_requirements("six==1.16\\nPyYAML>=6")   # ('pyyaml>=6', 'six==1.16')
    key = environment_key("3.12", requirements)                  # sha256 hex
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterator, Sequence

from packaging.requirements import InvalidRequirement as _PackagingInvalid
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from ..errors import InvalidRequirement

MAX_REQUIREMENTS = 256
MAX_LINE_CHARS = 1000
_KEY_FORMAT = 1  # bump when the layout of an environment changes

# A comment starts at '#' at the line start or after whitespace (pip's rule).
_COMMENT = re.compile(r"(^|\s+)#.*$")
_URL = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://")
_VCS = re.compile(r"^(git|hg|svn|bzr)\+", re.IGNORECASE)
_ARCHIVE = re.compile(r"\.(whl|zip|tar|tar\.gz|tgz|tar\.bz2|tar\.xz)$", re.IGNORECASE)


def parse_requirements(text: str) -> tuple[str, ...]:
    """The requirement lines of ``text`` validated and normalized, sorted, deduplicated.

    Raises ``errors.InvalidRequirement`` naming the first offending line.
    """
    found = {normalize_requirement(line) for line in _logical_lines(text)}
    if len(found) > MAX_REQUIREMENTS:
        raise InvalidRequirement(
            f"{len(found)} requirements", f"at most {MAX_REQUIREMENTS} are allowed"
        )
    return tuple(sorted(found))


def normalize_requirement(line: str) -> str:
    """One requirement line (no comment) in normalized form, or ``InvalidRequirement``."""
    line = line.strip()
    _refuse_non_requirements(line)
    try:
        req = Requirement(line)
    except _PackagingInvalid as exc:
        reason = str(exc).splitlines()[0] if str(exc) else "not a valid requirement"
        raise InvalidRequirement(line, f"not a PEP 508 requirement ({reason})") from None
    if req.url is not None:
        raise InvalidRequirement(line, "direct references (name @ url) are not allowed")
    return _format(req)


def requirement_name(requirement: str) -> str:
    """The normalized project name of a (valid) requirement string."""
    return canonicalize_name(Requirement(requirement).name)


def environment_key(python_version: str, requirements: Sequence[str], *, salt: str = "") -> str:
    """A stable sha256 hex of (interpreter version, normalized requirements, installer ``salt``).

    Spelling, order and duplicates of ``requirements`` do not change the key.
    """
    normalized = sorted({normalize_requirement(r) for r in requirements})
    payload = {"format": _KEY_FORMAT, "python": python_version, "requirements": normalized}
    if salt:
        payload["salt"] = salt
    blob = json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()


def _logical_lines(text: str) -> Iterator[str]:
    """Non-empty lines without comments, with backslash continuations joined."""
    pending = ""
    for raw in text.splitlines():
        if len(raw) > MAX_LINE_CHARS:
            raise InvalidRequirement(raw[:60] + "...", f"longer than {MAX_LINE_CHARS} characters")
        line = _COMMENT.sub("", raw)
        if line.endswith("\\"):
            pending += line[:-1]
            continue
        line, pending = (pending + line).strip(), ""
        if line:
            yield line
    if pending.strip():
        yield pending.strip()


def _refuse_non_requirements(line: str) -> None:
    if line.startswith("-"):
        raise InvalidRequirement(line, "option lines are not allowed (names and versions only)")
    if _VCS.match(line):
        raise InvalidRequirement(line, "VCS references are not allowed")
    if _URL.search(line):
        raise InvalidRequirement(line, "URLs are not allowed")
    if " --" in line or "\t--" in line:
        raise InvalidRequirement(line, "per-requirement options are not allowed")
    head = re.split(r"[;\s\[<>=!~@]", line, maxsplit=1)[0]
    if line.startswith((".", "/", "~")) or "/" in head or "\\" in head or _ARCHIVE.search(head):
        raise InvalidRequirement(line, "local paths and archives are not allowed")


def _format(req: Requirement) -> str:
    text: str = canonicalize_name(req.name)
    if req.extras:
        text += "[" + ",".join(sorted({canonicalize_name(e) for e in req.extras})) + "]"
    text += str(req.specifier)
    if req.marker is not None:
        text += f"; {req.marker}"
    return text
