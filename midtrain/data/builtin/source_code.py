"""``python-stdlib``: real code, the standard library's ``.py`` sources, one file per record."""

from __future__ import annotations

from collections.abc import Iterator

from midtrain.data.builtin._stdlib import _limit, _stdlib_files

_MAX_SOURCE_BYTES = 200_000


def _python_stdlib_records() -> Iterator[dict[str, str]]:
    for relpath, path in _stdlib_files():
        try:
            if path.stat().st_size > _MAX_SOURCE_BYTES:
                continue
            raw = path.read_bytes()
        except OSError:
            continue
        try:
            # Decode bytes directly so the text is byte-faithful (no newline translation).
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            continue
        if not text.strip():
            continue  # many package __init__.py files are empty
        yield {"text": text, "path": relpath}


def python_stdlib(max_docs: int | None = None) -> Iterator[dict[str, str]]:
    """Standard-library source files, one per record: ``{"text": source, "path": relpath}``.

    Files are ordered by relative path; empty files, files over 200 kB and files that are not
    valid UTF-8 are skipped.
    """
    yield from _limit(_python_stdlib_records(), max_docs)
