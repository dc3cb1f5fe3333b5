"""Where documents come from, and the template that renders one record into text segments.

A source spec (the ``source:`` mapping of a domain) is handled by the first registered
:class:`Source` that claims it: built-in generators (``{builtin: name}``), local files
(``{path: file.jsonl}`` or ``{path: json, data_files: ...}``), or anything else
``datasets.load_dataset`` reads (hub datasets). A new kind of source is one class with the four
methods of :class:`Source`, registered with :func:`register_source`; nothing else changes.
"""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import os
import string
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from midtrain.errors import MidtrainError

Record = dict[str, Any]


class Source(Protocol):
    """One kind of record source. Records come out in a fixed order, as a ``datasets``
    ``Dataset`` (random access: shards read only their own records) or ``IterableDataset``."""

    def claims(self, spec: dict[str, Any]) -> bool:
        """Whether this kind handles ``spec`` (checked in registration order)."""

    def resolve(self, spec: dict[str, Any], where: str) -> dict[str, Any]:
        """The normalised spec; every check that needs no record is made here (before anything
        is written). ``where`` names the spec in errors."""

    def fingerprint(self, spec: dict[str, Any], h: Any) -> None:
        """Feed what identifies the records beyond the spec itself into the sha256 ``h``."""

    def dataset(self, spec: dict[str, Any]) -> Any:
        """The records of a resolved spec."""

    def diagnose(self, spec: dict[str, Any]) -> str | None:
        """After a load error: the file, line and cause when they can be found, else None."""


_SOURCES: list[Source] = []


def register_source(source: Source) -> Source:
    """Add a kind of source; earlier registrations are asked first."""
    _SOURCES.append(source)
    return source


def source_for(spec: dict[str, Any], where: str = "source") -> Source:
    for source in _SOURCES:
        if source.claims(spec):
            return source
    raise MidtrainError(
        f"{where}: a source needs `path` (hub name, builder or local file) or `builtin`"
    )


def resolve_source(spec: dict[str, Any], where: str) -> dict[str, Any]:
    """Normalise a source spec and check what can be checked without reading records."""
    return source_for(spec, where).resolve(dict(spec), where)


def source_fingerprint(spec: dict[str, Any]) -> str:
    """Cheap identity of a source: its spec plus what its kind adds (local file sizes and
    mtimes; the Python version for built-ins). Pin a hub dataset's ``revision`` to detect
    upstream changes."""
    h = hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode())
    source_for(spec).fingerprint(spec, h)
    return h.hexdigest()[:16]


# Datasets opened in this process, by source fingerprint: forked prepare workers inherit them
# instead of each opening the source again.
_OPENED: dict[str, Any] = {}


def record_batches(
    spec: dict[str, Any], where: str, batch_size: int, index: int = 0, count: int = 1
) -> Iterator[tuple[int, list[Record]]]:
    """(index of the first record, records) for every ``batch_size`` records of the source
    whose batch number is ``index`` modulo ``count``: shard ``index`` of ``count``. A
    random-access dataset is read only where the shard needs it."""
    import datasets

    source = source_for(spec, where)
    try:
        key = source_fingerprint(spec)  # changes with local files: never a stale dataset
        ds = _OPENED.get(key)
        if ds is None:
            logger = logging.getLogger("datasets")
            level = logger.level
            logger.setLevel(logging.CRITICAL)  # its load errors come back as our one line
            try:
                ds = _OPENED[key] = source.dataset(spec)
            finally:
                logger.setLevel(level)
        if isinstance(ds, (datasets.DatasetDict, datasets.IterableDatasetDict)):
            raise MidtrainError(
                f"{where}: source {spec.get('path')!r} gives several splits "
                f"({', '.join(ds)}); set `split:`"
            )
        if isinstance(ds, datasets.Dataset):
            for b in range(index, (len(ds) + batch_size - 1) // batch_size, count):
                yield b * batch_size, _rows(ds[b * batch_size : (b + 1) * batch_size])
        else:
            for b, columns in enumerate(ds.iter(batch_size=batch_size)):
                if b % count == index:
                    yield b * batch_size, _rows(columns)
    except (MidtrainError, GeneratorExit):
        raise
    except FileNotFoundError as e:
        raise MidtrainError(f"{where}: {e}") from None
    except Exception as e:  # datasets raises many types for a bad spec or file; one line
        if os.environ.get("MIDTRAIN_TRACEBACK"):
            raise
        found = source.diagnose(spec)
        if found is not None:
            raise MidtrainError(f"{where}: {found}") from None
        cause = e.__cause__ or e
        msg = str(cause).strip().splitlines()[0] if str(cause).strip() else type(cause).__name__
        raise MidtrainError(f"{where}: could not load records: {msg}") from None


def known_length(spec: dict[str, Any]) -> int | None:
    """Records in the source when it has been opened here and knows its length (a local file
    or a downloaded dataset; not a stream or a generator): a progress bar's total."""
    ds = _OPENED.get(source_fingerprint(spec))
    try:
        return len(ds) if ds is not None else None
    except TypeError:  # an iterable dataset has no length
        return None


def _rows(columns: dict[str, list[Any]]) -> list[Record]:
    names = list(columns)
    if not names:
        return []
    return [dict(zip(names, values, strict=True)) for values in zip(*columns.values(), strict=True)]


# -- built-in generators -----------------------------------------------------------------------


class BuiltinSource:
    """``{builtin: name, **arguments}``: a generator of midtrain.data.builtin (no network)."""

    def claims(self, spec: dict[str, Any]) -> bool:
        return "builtin" in spec

    def resolve(self, spec: dict[str, Any], where: str) -> dict[str, Any]:
        from midtrain.data.builtin import BUILTIN_SOURCES

        if spec["builtin"] not in BUILTIN_SOURCES:
            raise MidtrainError(
                f"{where}.builtin: unknown builtin source {spec['builtin']!r}; "
                f"known: {', '.join(sorted(BUILTIN_SOURCES))}"
            )
        return spec

    def fingerprint(self, spec: dict[str, Any], h: Any) -> None:
        h.update(sys.version.encode())  # they read the running Python installation

    def dataset(self, spec: dict[str, Any]) -> Any:
        import datasets

        from midtrain.data.builtin import BUILTIN_SOURCES

        kwargs = {k: v for k, v in spec.items() if k != "builtin"}
        return datasets.IterableDataset.from_generator(
            BUILTIN_SOURCES[spec["builtin"]], gen_kwargs=kwargs
        )

    def diagnose(self, spec: dict[str, Any]) -> str | None:
        return None


# -- local files -------------------------------------------------------------------------------

# A local file given as `path:` is loaded with the matching packaged builder.
_BUILDER_BY_SUFFIX = {
    ".jsonl": "json",
    ".json": "json",
    ".parquet": "parquet",
    ".csv": "csv",
    ".txt": "text",
    ".text": "text",
}
_LOCAL_BUILDERS = {"json", "text", "csv", "parquet", "arrow"}


def _as_list(x: Any) -> list[str]:
    if isinstance(x, str):
        return [x]
    if isinstance(x, dict):
        return [f for v in x.values() for f in _as_list(v)]
    return [str(f) for f in x]


def _is_pattern(f: str) -> bool:
    return any(c in f for c in "*?[")


def _local_files(spec: dict[str, Any]) -> list[Path]:
    out = []
    for f in _as_list(spec.get("data_files", [])):
        if "://" in f:
            continue
        out += (
            [Path(m) for m in sorted(glob.glob(f, recursive=True))] if _is_pattern(f) else [Path(f)]
        )
    return out


class LocalFiles:
    """``{path: file.jsonl|.json|.parquet|.csv|.txt}`` or ``{path: <builder>, data_files: ...}``
    read by the packaged ``datasets`` builders. Text files are read as UTF-8 with a leading
    byte-order mark dropped (``utf-8-sig``) and universal newlines (CRLF and CR become LF)."""

    def claims(self, spec: dict[str, Any]) -> bool:
        path = str(spec.get("path", ""))
        return (Path(path).suffix.lower() in _BUILDER_BY_SUFFIX and "data_files" not in spec) or (
            path in _LOCAL_BUILDERS and "data_files" in spec
        )

    def resolve(self, spec: dict[str, Any], where: str) -> dict[str, Any]:
        path = str(spec["path"])
        if path not in _LOCAL_BUILDERS:  # the shorthand: one file as `path`
            if not Path(path).is_file():
                raise MidtrainError(f"{where}.path: file not found: {path}")
            if Path(path).stat().st_size == 0:
                raise MidtrainError(f"{where}.path: empty domain: {path} is an empty file")
            spec["path"] = _BUILDER_BY_SUFFIX[Path(path).suffix.lower()]
            spec["data_files"] = path
            where = f"{where}.path"
        else:
            where = f"{where}.data_files"
            files = _as_list(spec["data_files"])
            if not files:
                raise MidtrainError(f"{where}: the list is empty; name at least one file")
            for f in files:
                if "://" in f:
                    continue
                if _is_pattern(f) and not glob.glob(f, recursive=True):
                    raise MidtrainError(f"{where}: no file matches {f}")
                if not _is_pattern(f) and not Path(f).is_file():
                    raise MidtrainError(f"{where}: file not found: {f}")
        if spec["path"] == "text":
            spec.setdefault("encoding", "utf-8-sig")
        spec.setdefault("split", "train")
        return spec

    def fingerprint(self, spec: dict[str, Any], h: Any) -> None:
        for m in _local_files(spec):
            if m.is_file():
                st = m.stat()
                h.update(f"{m.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode())

    def dataset(self, spec: dict[str, Any]) -> Any:
        import datasets

        return datasets.load_dataset(**spec)

    def diagnose(self, spec: dict[str, Any]) -> str | None:
        if spec["path"] not in ("json", "text"):
            return None
        for path in _local_files(spec):
            found = _diagnose_file(path, spec["path"])
            if found is not None:
                return found
        return None


def _diagnose_file(path: Path, builder: str) -> str | None:
    """What is wrong with a local text/JSON file: read line by line, on the error path only."""
    with path.open("rb") as f:
        head = f.read(1 << 16)
    nul = head.find(b"\x00")
    if nul >= 0:
        return f"{path}: a binary file (NUL byte at offset {nul}), not UTF-8 text"
    if builder == "json" and head.lstrip(b"\xef\xbb\xbf \t\r\n").startswith(b"["):
        try:  # a JSON array (.json): one document, parsed whole
            json.loads(path.read_bytes().decode("utf-8-sig"))
        except UnicodeDecodeError:
            pass  # reported below, with its line
        except json.JSONDecodeError as e:
            return f"{path}:{e.lineno}: malformed JSON: {e.msg} (column {e.colno})"
    problem, offset = None, 0
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
            except UnicodeDecodeError as e:
                start = e.start - (3 if lineno == 1 and raw.startswith(b"\xef\xbb\xbf") else 0)
                return (
                    f"{path}:{lineno}: not UTF-8: byte 0x{raw[e.start]:02x} at offset "
                    f"{offset + e.start} (line {lineno}, column {start + 1}); convert the "
                    "file to UTF-8"
                )
            offset += len(raw)
            if builder != "json" or problem is not None or not line.strip():
                if problem is not None and line.strip():
                    return problem  # a bad line with more after it: not a truncation
                continue
            if head.lstrip(b"\xef\xbb\xbf \t\r\n").startswith(b"["):
                continue
            try:
                value = json.loads(line.rstrip("\r\n"))
            except json.JSONDecodeError as e:
                problem = f"{path}:{lineno}: malformed JSON line: {e.msg} (column {e.colno})"
                continue
            if not isinstance(value, dict):
                return f"{path}:{lineno}: a JSON line must be an object, got {type(value).__name__}"
    return None if problem is None else problem + "; the file looks truncated"


# -- datasets.load_dataset: hub datasets and every other builder ---------------------------------


class LoadDataset:
    """Any other ``datasets.load_dataset`` keyword arguments, e.g. a hub dataset."""

    def claims(self, spec: dict[str, Any]) -> bool:
        return "path" in spec

    def resolve(self, spec: dict[str, Any], where: str) -> dict[str, Any]:
        spec.setdefault("split", "train")
        return spec

    def fingerprint(self, spec: dict[str, Any], h: Any) -> None:
        pass  # identified by the spec; pin `revision` to notice upstream changes

    def dataset(self, spec: dict[str, Any]) -> Any:
        import datasets

        return datasets.load_dataset(**spec)

    def diagnose(self, spec: dict[str, Any]) -> str | None:
        return None


register_source(BuiltinSource())
register_source(LocalFiles())
register_source(LoadDataset())


# -- templates -----------------------------------------------------------------------------------

Segment = tuple[str, bool]  # (text, counts in the loss)


@dataclass
class Template:
    """Renders a record to text segments, each either trained on or (maskable) context.

    text: one plain document. prompt + response: an instruction pair, the prompt being
      context. chat: the name of a field holding a list of turns, either dicts with
      ``role``/``content`` (or ShareGPT's ``from``/``value``) or plain strings alternating user
      and assistant; each turn is rendered with ``chat_turn`` and only ``train_roles`` are
      trained on. chat_template (with ``chat``): render the whole conversation with a Jinja
      chat template instead, ``tokenizer`` (the model directory's own, from ``tokenizer.hub``)
      or a ``.jinja`` file; see :mod:`midtrain.data.chat` for which text is trained on.
    """

    text: str | None = "{text}"
    prompt: str | None = None
    response: str | None = None
    chat: str | None = None
    chat_turn: str = "{role}: {content}\n"
    train_roles: list[str] = field(default_factory=lambda: ["assistant"])
    chat_template: str | None = None

    def __post_init__(self) -> None:
        if (self.prompt is None) != (self.response is None):
            raise MidtrainError("template: `prompt` and `response` go together")
        if self.chat is not None and self.prompt is not None:
            raise MidtrainError("template: give either `chat` or `prompt`/`response`")
        if self.text is None and self.prompt is None and self.chat is None:
            raise MidtrainError("template: `text` is null; give it, `prompt`/`response` or `chat`")
        if self.chat_template is not None and self.chat is None:
            raise MidtrainError(
                "template: `chat_template` renders a list of turns; name its field with `chat`"
            )
        self._renderer: Any = None  # the ChatTemplate, bound once the tokenizer is known

    @property
    def renderer(self) -> Any:
        """The bound chat template, or None."""
        return self._renderer

    def bind(self, renderer: Any) -> None:
        """Attach the loaded chat template (a :class:`midtrain.data.chat.ChatTemplate`)."""
        self._renderer = renderer

    def template(self) -> Template:
        """Only the keys that apply (``text`` is ignored with ``chat`` or ``prompt``)."""
        if self.chat is not None:
            return Template(
                text=None,
                chat=self.chat,
                chat_turn=self.chat_turn,
                train_roles=list(self.train_roles),
                chat_template=self.chat_template,
            )
        if self.prompt is not None:
            return Template(text=None, prompt=self.prompt, response=self.response)
        return Template(text=self.text)

    @property
    def has_context(self) -> bool:
        """Whether some segments are context (maskable) rather than trained text."""
        return self.prompt is not None or self.chat is not None

    @property
    def text_fields(self) -> set[str]:
        """Fields rendered by format strings (they must hold strings or numbers)."""
        if self.chat is not None:
            return set()
        parts = [self.prompt, self.response] if self.prompt is not None else [self.text]
        return {
            name.split(".")[0].split("[")[0]
            for part in parts
            if part
            for _, name, _, _ in string.Formatter().parse(part)
            if name
        }

    @property
    def fields(self) -> set[str]:
        return {self.chat} if self.chat is not None else self.text_fields

    def check(self, record: Record, where: str) -> None:
        missing = sorted(self.fields - set(record))
        if missing:
            raise MidtrainError(
                f"{where}: template field {{{missing[0]}}} is not in the records "
                f"(fields: {', '.join(sorted(record))})"
            )
        if self.chat is not None and not isinstance(record[self.chat], list):
            raise MidtrainError(f"{where}.chat: field {self.chat!r} is not a list of turns")

    def check_values(self, record: Record, where: str, index: int) -> None:
        """A list or mapping in a rendered field would be stored as its Python repr: refuse."""
        for name in self.text_fields:
            value = record.get(name)
            if isinstance(value, (list, dict)):
                kind = "list" if isinstance(value, list) else "mapping"
                raise MidtrainError(
                    f"{where}: template field {{{name}}} holds a {kind} in record {index}; "
                    f"templates render strings and numbers: join the field in the source, or "
                    f"use `chat: {name}` for a list of turns"
                )

    def messages(self, record: Record) -> list[dict[str, Any]]:
        """The turns of a chat record as ``{"role", "content", ...}`` messages."""
        out = []
        for i, turn in enumerate(record[self.chat] or []):  # type: ignore[index]
            if isinstance(turn, str):
                message: dict[str, Any] = {}
                role, content = ("user" if i % 2 == 0 else "assistant"), turn
            else:
                message = {k: v for k, v in turn.items() if k not in ("from", "value")}
                role = turn.get("role", turn.get("from", ""))
                content = turn.get("content", turn.get("value", ""))
            role = {"human": "user", "gpt": "assistant"}.get(role, role)
            out.append({**message, "role": role, "content": content or ""})
        return out

    def segments(self, record: Record) -> list[Segment]:
        if self.chat is not None:
            messages = self.messages(record)
            if self.chat_template is not None:
                if self._renderer is None:
                    raise MidtrainError("template: the chat template was not loaded")
                return self._renderer.segments(messages, self.train_roles)
            return [
                (
                    self.chat_turn.format(role=m["role"], content=m["content"]),
                    m["role"] in self.train_roles,
                )
                for m in messages
            ]
        rec = {k: ("" if v is None else v) for k, v in record.items()}
        if self.prompt is not None and self.response is not None:  # together (__post_init__)
            return [(self.prompt.format_map(rec), False), (self.response.format_map(rec), True)]
        plain = self.text
        assert plain is not None  # __post_init__: text unless prompt or chat
        return [(plain.format_map(rec), True)]
