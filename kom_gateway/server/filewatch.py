"""Telling when files changed, by content.

Kubernetes Secret and ConfigMap volumes replace files by swapping a symlink, and tools
rewrite files in place, so timestamps and inotify on the path say little; comparing the
(small) contents does not miss a change and never reports one that did not happen.
"""

from __future__ import annotations


class FileSet:
    """The contents of a few small files, to tell when any of them changed."""

    def __init__(self, paths: tuple[str, ...]) -> None:
        self.paths = tuple(p for p in paths if p)
        self._snapshot = self._read()

    def _read(self) -> tuple[bytes, ...] | None:
        try:
            contents = []
            for path in self.paths:
                with open(path, "rb") as f:
                    contents.append(f.read())
            return tuple(contents)
        except OSError:
            return None  # mid-swap or gone: no verdict this time

    def changed(self) -> bool:
        """True once per change of contents (an unreadable moment is not a change)."""
        current = self._read()
        if current is None or current == self._snapshot:
            return False
        self._snapshot = current
        return True
