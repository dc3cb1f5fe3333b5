"""Offline, deterministic record generators so the demo job runs with no network.

Three sources are built in:

* ``python-docs``   (``prose.py``) English prose: the pydoc topic pages shipped with CPython,
  then the longer module docstrings of the standard library.
* ``python-stdlib`` (``source_code.py``) Real code: the standard library's ``.py`` sources,
  one file per record.
* ``arithmetic``    (``word_problems.py``) Seeded GSM8K-style word problems with worked,
  calculator-annotated answers.

Every generator is a pure function of its arguments (plus the Python installation it runs
on) and yields JSON-serialisable ``dict[str, str]`` records, so they can be wrapped with
``datasets.IterableDataset.from_generator`` elsewhere. This package deliberately uses only the
standard library; this module keeps the registry.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from midtrain.data.builtin.prose import _file_docstrings as _file_docstrings  # its cache
from midtrain.data.builtin.prose import python_docs
from midtrain.data.builtin.source_code import python_stdlib
from midtrain.data.builtin.word_problems import arithmetic

__all__ = [
    "BUILTIN_SOURCES",
    "arithmetic",
    "builtin_records",
    "python_docs",
    "python_stdlib",
]

BUILTIN_SOURCES: dict[str, Callable[..., Iterator[dict[str, str]]]] = {
    "python-docs": python_docs,
    "python-stdlib": python_stdlib,
    "arithmetic": arithmetic,
}


def builtin_records(name: str, **kwargs: object) -> Iterator[dict[str, str]]:
    """Records of the built-in source ``name``; ``kwargs`` go to its generator function."""
    try:
        factory = BUILTIN_SOURCES[name]
    except KeyError:
        known = ", ".join(sorted(BUILTIN_SOURCES))
        raise ValueError(f"unknown builtin source {name!r}; known: {known}") from None
    return factory(**kwargs)
