"""The tree a tar archive would create, checked entry by entry before anything is written.

A trie of path components (deep paths cost no quadratic prefix work) that
refuses, naming the entry: a path through a symlink or below a file, an entry
that replaces a symlink or one of another kind, more nodes than allowed
(parent directories without an entry of their own count too: they are inodes
on disk all the same) and, once every entry is in, a symlink whose target,
resolved the way the kernel would through the archive's other symlinks in its
final state, is absolute or leaves the root.

Usage::

    tree = ArchiveTree(max_nodes=100_000)
    tree.add("pkg/mod.py", ["pkg", "mod.py"], "file")
    tree.add("up", ["up"], "symlink", target="..")
    tree.check_links()  # UnsafeArchive: 'up' ... resolves outside the archive root
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

from python_executor_server import errors

Kind = Literal["dir", "file", "symlink"]
_MAX_LINK_DEPTH = 40  # the kernel's ELOOP limit


def too_many_entries(maximum: int) -> errors.BadRequest:
    return errors.BadRequest(
        f"the archive has more than {maximum} entries (the maximum, parent directories included)"
    )


class _Node:
    __slots__ = ("children", "entry", "kind", "parent", "resolved", "resolving", "target")

    def __init__(self, kind: Kind, parent: _Node | None) -> None:
        self.kind: Kind = kind
        self.parent = parent
        self.children: dict[str, _Node] = {}
        self.entry = ""  # symlinks: the archive entry, for messages
        self.target = ""  # symlinks: the link target
        self.resolved: tuple[_Node, int] | None = None
        self.resolving = False


class _Escape(Exception):
    """A symlink target that cannot be allowed; the message says why."""


class ArchiveTree:
    def __init__(self, max_nodes: int) -> None:
        self.files: dict[str, None] = {}  # regular files, an ordered set, in archive order
        self._root = _Node("dir", None)
        self._links: list[_Node] = []
        self._nodes = 0
        self._max_nodes = max_nodes

    def add(self, entry: str, parts: Sequence[str], kind: Kind, target: str = "") -> None:
        """Record entry ``entry``, whose normalised path is ``parts`` (not empty)."""
        node = self._root
        for i in range(len(parts) - 1):
            node = self._descend(entry, node, parts, i)
        self._place(entry, node, parts[-1], kind, target)
        if kind == "file":
            self.files["/".join(parts)] = None

    def check_links(self) -> None:
        """Resolve every symlink in the final tree; call once every entry is in."""
        for link in self._links:
            try:
                self._target_of(link, 0)
            except _Escape as exc:
                raise errors.UnsafeArchive(
                    link.entry, f"its target {link.target!r} {exc}"
                ) from None

    def _descend(self, entry: str, node: _Node, parts: Sequence[str], i: int) -> _Node:
        child = node.children.get(parts[i])
        if child is None:
            return self._new(node, parts[i], "dir")
        if child.kind == "dir":
            return child
        where = "/".join(parts[: i + 1])
        if child.kind == "symlink":
            raise errors.UnsafeArchive(entry, f"its path passes through the symlink {where!r}")
        raise errors.UnsafeArchive(entry, f"its parent {where!r} is a file")

    def _place(self, entry: str, parent: _Node, name: str, kind: Kind, target: str) -> None:
        existing = parent.children.get(name)
        if existing is None:
            node = self._new(parent, name, kind)
            if kind == "symlink":
                node.entry, node.target = entry, target
                self._links.append(node)
        elif existing.kind != kind or kind == "symlink":
            raise errors.UnsafeArchive(entry, f"it would replace an earlier {existing.kind}")

    def _new(self, parent: _Node, name: str, kind: Kind) -> _Node:
        self._nodes += 1
        if self._nodes > self._max_nodes:
            raise too_many_entries(self._max_nodes)
        node = parent.children[name] = _Node(kind, parent)
        return node

    def _target_of(self, link: _Node, depth: int) -> tuple[_Node, int]:
        """What ``link`` names: (the deepest existing node, missing components below it)."""
        if link.resolved is None:
            if link.resolving or depth > _MAX_LINK_DEPTH:
                raise _Escape("is part of a symlink loop (or a chain of more than 40)")
            link.resolving = True
            assert link.parent is not None  # the root is never a symlink
            link.resolved = self._walk(link.parent, link.target, depth)
            link.resolving = False
        return link.resolved

    def _walk(self, start: _Node, target: str, depth: int) -> tuple[_Node, int]:
        if target.startswith("/"):
            raise _Escape("is an absolute path")
        node, missing = start, 0
        for part in target.split("/"):
            if part in ("", "."):
                continue
            if part == "..":
                if missing:
                    missing -= 1
                elif node.parent is None:
                    raise _Escape("resolves outside the archive root")
                else:
                    node = node.parent
                continue
            child = None if missing else node.children.get(part)
            if child is None or child.kind == "file":
                missing += 1  # nothing there (or ENOTDIR): no symlink can lie below
            elif child.kind == "symlink":
                node, missing = self._target_of(child, depth + 1)
            else:
                node = child
        return node, missing
