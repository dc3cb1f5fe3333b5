"""``python-docs``: English prose from the running CPython: the pydoc topic pages, then the
longer module docstrings of the standard library (parsed, never imported)."""

from __future__ import annotations

import ast
import functools
import gc
import warnings
from collections.abc import Iterator
from pathlib import Path

from midtrain.data.builtin._stdlib import _limit, _stdlib_files

_MIN_MODULE_DOCSTRING_CHARS = 200


def _parse_module(source: bytes, filename: str) -> ast.Module | None:
    """Parse without importing; ``None`` for files the running interpreter cannot parse."""
    try:
        with warnings.catch_warnings():
            # Old escape sequences in some modules emit Syntax/DeprecationWarnings; irrelevant here.
            warnings.simplefilter("ignore")
            return ast.parse(source, filename=filename)
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return None


def _api_docstrings(tree: ast.Module, module_name: str) -> list[str]:
    """Docstrings of classes and functions, each headed by its dotted name, in source order."""
    parts: list[str] = []

    def visit(body: list[ast.stmt], prefix: str) -> None:
        for node in body:
            if isinstance(node, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                qualname = f"{prefix}.{node.name}"
                doc = ast.get_docstring(node)
                if doc and doc.strip():
                    parts.append(f"{qualname}\n\n{doc}")
                visit(node.body, qualname)

    visit(tree.body, module_name)
    return parts


def _module_name(relpath: str) -> str:
    dotted = relpath.removesuffix(".py").replace("/", ".")
    return dotted.removesuffix(".__init__")


def _python_docs_records(include_api_docstrings: bool) -> Iterator[dict[str, str]]:
    from pydoc_data.topics import topics  # deferred: only needed by this source

    for key in sorted(topics):
        text = topics[key]
        if text.strip():
            yield {"text": text}

    for relpath, path in _stdlib_files():
        try:
            stat = path.stat()
        except OSError:
            continue
        docs = _file_docstrings(str(path), relpath, stat.st_mtime_ns, stat.st_size)
        if docs is None:
            continue
        module_doc, api_docs = docs
        if include_api_docstrings:
            text = "\n\n".join([module_doc, *api_docs] if module_doc.strip() else api_docs)
        else:
            text = module_doc
        if len(text) >= _MIN_MODULE_DOCSTRING_CHARS and text.strip():
            yield {"text": text}


# Parsing the stdlib takes ~1.5 s and streaming datasets re-run the generator every epoch, so
# remember the extracted docstrings. The stat fields in the key keep this a pure function of
# the file contents in practice (an edited file gets re-parsed).
@functools.cache
def _file_docstrings(
    path: str, relpath: str, mtime_ns: int, size: int
) -> tuple[str, tuple[str, ...]] | None:
    try:
        source = Path(path).read_bytes()
    except OSError:
        return None
    # A parse allocates ~10^5 acyclic nodes that refcounting frees; letting the cyclic GC run
    # meanwhile makes it rescan every live object (huge once torch is imported: 1.3 s -> 3 s).
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        # Bytes (not str) so ast honours any PEP 263 coding cookie itself.
        tree = _parse_module(source, relpath)
        if tree is None:
            return None
        module_doc = ast.get_docstring(tree) or ""
        return module_doc, tuple(_api_docstrings(tree, _module_name(relpath)))
    finally:
        if gc_was_enabled:
            gc.enable()


def python_docs(
    max_docs: int | None = None, include_api_docstrings: bool = False
) -> Iterator[dict[str, str]]:
    """English prose from the running CPython: pydoc topics, then long module docstrings.

    Yields ``{"text": ...}``. Topics come first, sorted by key; then, for each stdlib module in
    path order, its module docstring if it has at least 200 characters. With
    ``include_api_docstrings`` the module's class/function docstrings are appended to the same
    document (about 3.5x the prose; off by default to keep the documented behaviour).
    """
    yield from _limit(_python_docs_records(include_api_docstrings), max_docs)
