"""What the prose and code generators share: the standard library's ``.py`` files in a
reproducible order, and the optional ``max_docs`` cap."""

from __future__ import annotations

import itertools
import os
import sysconfig
from collections.abc import Iterator
from pathlib import Path

# Directories that are not representative library code (tests, the IDE, the 2to3 tool with
# its Python 2 fixtures) or that belong to third-party packages / bytecode caches.
_SKIP_DIRS = frozenset(
    {"test", "tests", "idle_test", "idlelib", "lib2to3", "site-packages", "__pycache__"}
)


def _limit(records: Iterator[dict[str, str]], max_docs: int | None) -> Iterator[dict[str, str]]:
    """Apply the optional ``max_docs`` cap shared by the file-based sources."""
    if max_docs is None:
        return records
    if max_docs < 0:
        raise ValueError(f"max_docs must be >= 0 or None, got {max_docs}")
    return itertools.islice(records, max_docs)


def _stdlib_files() -> list[tuple[str, Path]]:
    """All stdlib ``.py`` files as ``(relative posix path, absolute path)``, sorted by path.

    Sorting the full relative path (rather than relying on ``os.walk`` order, which depends on
    the filesystem) is what makes the sources reproducible.
    """
    root = Path(sysconfig.get_paths()["stdlib"])
    found: list[tuple[str, Path]] = []
    for dirpath, dirnames, filenames in os.walk(root):
        # Prune in place so os.walk never descends into skipped trees.
        dirnames[:] = [d for d in dirnames if d not in _SKIP_DIRS]
        for name in filenames:
            if name.endswith(".py"):
                path = Path(dirpath) / name
                found.append((path.relative_to(root).as_posix(), path))
    found.sort(key=lambda item: item[0])
    return found
