"""Where documents come from: a ``datasets.load_dataset`` spec or a built-in generator, and
the template that renders one record into (prompt, response) text."""

from __future__ import annotations

import hashlib
import json
import string
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from midtrain.errors import MidtrainError

# A local file given as `path:` is loaded with the matching packaged builder.
_BUILDER_BY_SUFFIX = {
    ".jsonl": "json",
    ".json": "json",
    ".parquet": "parquet",
    ".csv": "csv",
    ".txt": "text",
    ".text": "text",
}


def _as_list(x: Any) -> list[str]:
    if isinstance(x, str):
        return [x]
    if isinstance(x, dict):
        return [f for v in x.values() for f in _as_list(v)]
    return [str(f) for f in x]


def resolve_source(spec: dict[str, Any], where: str) -> dict[str, Any]:
    """Normalise a source spec; check local files exist. ``where`` names it in errors."""
    spec = dict(spec)
    if "builtin" in spec:
        from midtrain.builtin import BUILTIN_SOURCES

        if spec["builtin"] not in BUILTIN_SOURCES:
            raise MidtrainError(
                f"{where}.builtin: unknown builtin source {spec['builtin']!r}; "
                f"known: {', '.join(sorted(BUILTIN_SOURCES))}"
            )
        return spec
    if "path" not in spec:
        raise MidtrainError(
            f"{where}: a source needs `path` (hub name, builder or local file) or `builtin`"
        )
    path = str(spec["path"])
    suffix = Path(path).suffix.lower()
    if suffix in _BUILDER_BY_SUFFIX and "data_files" not in spec:
        if not Path(path).is_file():
            raise MidtrainError(f"{where}.path: file not found: {path}")
        if Path(path).stat().st_size == 0:
            raise MidtrainError(f"{where}.path: empty domain: {path} is an empty file")
        spec["path"] = _BUILDER_BY_SUFFIX[suffix]
        spec["data_files"] = path
    if "data_files" in spec:
        for f in _as_list(spec["data_files"]):
            if "://" not in f and not any(c in f for c in "*?[") and not Path(f).is_file():
                raise MidtrainError(f"{where}.data_files: file not found: {f}")
    spec.setdefault("split", "train")
    return spec


def source_fingerprint(spec: dict[str, Any]) -> str:
    """Cheap identity of a source: its spec plus size and mtime of every local file.

    Hub datasets are identified by name and ``revision``; pin a revision to detect upstream
    changes. Builtin sources depend on the Python installation they are read from.
    """
    h = hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode())
    if "builtin" in spec:
        h.update(sys.version.encode())
    for f in _as_list(spec.get("data_files", [])):
        p = Path(f)
        matches = sorted(p.parent.glob(p.name)) if any(c in f for c in "*?[") else [p]
        for m in matches:
            if m.is_file():
                st = m.stat()
                h.update(f"{m.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


def iter_records(spec: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Records of a resolved source, in a deterministic order, loaded through ``datasets``."""
    import datasets

    if "builtin" in spec:
        from midtrain.builtin import BUILTIN_SOURCES

        kwargs = {k: v for k, v in spec.items() if k != "builtin"}
        ds = datasets.IterableDataset.from_generator(
            BUILTIN_SOURCES[spec["builtin"]], gen_kwargs=kwargs
        )
    else:
        ds = datasets.load_dataset(**spec)
        if isinstance(ds, (datasets.DatasetDict, datasets.IterableDatasetDict)):
            raise MidtrainError(
                f"source {spec.get('path')!r}: gives several splits "
                f"({', '.join(ds)}); set `split:`"
            )
    for batch in ds.iter(batch_size=1000):
        columns = list(batch)
        for i in range(len(batch[columns[0]]) if columns else 0):
            yield {c: batch[c][i] for c in columns}


@dataclass(frozen=True)
class Template:
    """Renders a record to text. ``text`` for plain documents; ``prompt`` + ``response`` for
    instruction data, where the prompt's tokens can be masked out of the loss."""

    text: str | None = "{text}"
    prompt: str | None = None
    response: str | None = None

    def __post_init__(self) -> None:
        if (self.prompt is None) != (self.response is None):
            raise MidtrainError("template: `prompt` and `response` go together")

    @property
    def is_instruction(self) -> bool:
        return self.prompt is not None

    @property
    def fields(self) -> set[str]:
        parts = [self.prompt, self.response] if self.is_instruction else [self.text]
        return {
            name.split(".")[0].split("[")[0]
            for part in parts
            if part
            for _, name, _, _ in string.Formatter().parse(part)
            if name
        }

    def check(self, record: dict[str, Any], where: str) -> None:
        missing = sorted(self.fields - set(record))
        if missing:
            raise MidtrainError(
                f"{where}: template field {{{missing[0]}}} is not in the records "
                f"(fields: {', '.join(sorted(record))})"
            )

    def render(self, record: dict[str, Any]) -> tuple[str, str]:
        """(prompt, response); plain documents have an empty prompt."""
        rec = {k: ("" if v is None else v) for k, v in record.items()}
        if self.is_instruction:
            return self.prompt.format_map(rec), self.response.format_map(rec)  # type: ignore[union-attr]
        return "", self.text.format_map(rec)  # type: ignore[union-attr]
