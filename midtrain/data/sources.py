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


Segment = tuple[str, bool]  # (text, counts in the loss)


@dataclass(frozen=True)
class Template:
    """Renders a record to text segments, each either trained on or (maskable) context.

    ``text``: one plain document. ``prompt`` + ``response``: an instruction pair, the prompt
    being context. ``chat``: the name of a field holding a list of turns, either dicts with
    ``role``/``content`` (or ShareGPT's ``from``/``value``) or plain strings alternating user
    and assistant; each turn is rendered with ``chat_turn`` and only ``train_roles`` are trained
    on.
    """

    text: str | None = "{text}"
    prompt: str | None = None
    response: str | None = None
    chat: str | None = None
    chat_turn: str = "{role}: {content}\n"
    train_roles: tuple[str, ...] = ("assistant",)

    def __post_init__(self) -> None:
        if (self.prompt is None) != (self.response is None):
            raise MidtrainError("template: `prompt` and `response` go together")
        if self.chat is not None and self.prompt is not None:
            raise MidtrainError("template: give either `chat` or `prompt`/`response`")

    @property
    def has_context(self) -> bool:
        """Whether some segments are context (maskable) rather than trained text."""
        return self.prompt is not None or self.chat is not None

    @property
    def fields(self) -> set[str]:
        if self.chat is not None:
            return {self.chat}
        parts = [self.prompt, self.response] if self.prompt is not None else [self.text]
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
        if self.chat is not None and not isinstance(record[self.chat], list):
            raise MidtrainError(f"{where}.chat: field {self.chat!r} is not a list of turns")

    def segments(self, record: dict[str, Any]) -> list[Segment]:
        rec = {k: ("" if v is None else v) for k, v in record.items()}
        if self.chat is not None:
            out = []
            for i, turn in enumerate(record[self.chat] or []):
                if isinstance(turn, str):
                    role, content = ("user" if i % 2 == 0 else "assistant"), turn
                else:
                    role = turn.get("role", turn.get("from", ""))
                    content = turn.get("content", turn.get("value", ""))
                role = {"human": "user", "gpt": "assistant"}.get(role, role)
                text = self.chat_turn.format(role=role, content=content or "")
                out.append((text, role in self.train_roles))
            return out
        if self.prompt is not None:
            return [(self.prompt.format_map(rec), False), (self.response.format_map(rec), True)]
        return [(self.text.format_map(rec), True)]  # type: ignore[union-attr]
