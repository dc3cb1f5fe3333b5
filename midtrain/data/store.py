"""Token stores: one directory per domain of memory-mapped token arrays.

Layout of a store root (written by ``midtrain prepare``)::

    <root>/store.json            index (StoreIndex): domains, tokenizer hash, format version
    <root>/tokenizer.json        the tokenizer every domain was encoded with
    <root>/<domain>/manifest.json
    <root>/<domain>/{train,val}.tokens   uint16 (vocab <= 65536) or uint32, documents joined by EOS
    <root>/<domain>/{train,val}.docs     int64 token offset of each document start, plus the end
    <root>/<domain>/{train,val}.bytes    int64 UTF-8 byte count of each document (for bits-per-byte)
    <root>/<domain>/{train,val}.mask     uint8 per-token loss mask (only for templated prompt data)

Everything is read through ``np.memmap``, so opening a store costs the same whatever its size.
The manifest records the size and sha256 of every file: sizes are checked at open (a stat per
file), content by ``midtrain prepare --verify``.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from midtrain.data.hub import TOKENIZER_FILE
from midtrain.errors import MidtrainError

if TYPE_CHECKING:
    from midtrain.data.corpora import Corpus

FORMAT_VERSION = 2
SPLITS = ("train", "val")
ORDERS = ("shuffled", "sequential")  # a domain's `order`: how the mixture reads its train split


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


_FILES: dict[tuple[int, Path], int] = {}  # (pid, path) -> fd: workers open their own


def _pread(path: Path, size: int, offset: int) -> bytes:
    key = (os.getpid(), path)
    fd = _FILES.get(key)
    if fd is None:
        fd = _FILES[key] = os.open(path, os.O_RDONLY)
    return os.pread(fd, size, offset)


def _memmap(path: Path, dtype: np.dtype) -> np.ndarray:
    # np.memmap refuses empty files; an empty split is a valid (empty) array.
    if path.stat().st_size == 0:
        return np.zeros(0, dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r")


@dataclass(frozen=True)
class Split:
    """One split of one domain: a flat token stream with document boundaries."""

    tokens: np.ndarray  # (n_tokens,) uint16/uint32, each document followed by EOS
    doc_offsets: np.ndarray  # (n_docs + 1,) int64
    doc_bytes: np.ndarray  # (n_docs,) int64
    loss_mask: np.ndarray | None  # (n_tokens,) uint8, or None = every token counts
    tokens_path: Path | None = None
    mask_path: Path | None = None

    def read(self, lo: int, hi: int) -> tuple[np.ndarray, np.ndarray | None]:
        """Tokens [lo, hi) (and their loss mask) with one ``pread`` each. The training loader
        reads this way, not through the memory map: random reads of a mapped file make the
        kernel map whole page-cache folios (up to 2 MB each), so resident memory would grow
        with the store; a pread copies just the bytes asked for."""
        if self.tokens_path is None:  # not backed by a file (an empty split)
            mask = None if self.loss_mask is None else np.asarray(self.loss_mask[lo:hi])
            return np.asarray(self.tokens[lo:hi]), mask
        dtype = self.tokens.dtype
        tokens = np.frombuffer(
            _pread(self.tokens_path, (hi - lo) * dtype.itemsize, lo * dtype.itemsize), dtype=dtype
        )
        mask = None
        if self.mask_path is not None:
            mask = np.frombuffer(_pread(self.mask_path, hi - lo, lo), dtype=np.uint8)
        return tokens, mask

    @property
    def num_tokens(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def num_docs(self) -> int:
        return int(self.doc_offsets.shape[0]) - 1

    @property
    def num_bytes(self) -> int:
        return int(self.doc_bytes.sum())

    def num_blocks(self, seq_len: int) -> int:
        """Blocks of seq_len + 1 tokens at stride seq_len: every token is a target once."""
        return max(0, (self.num_tokens - 1) // seq_len)

    def document(self, i: int) -> np.ndarray:
        """Tokens of document i, without its trailing EOS."""
        return np.asarray(self.tokens[self.doc_offsets[i] : self.doc_offsets[i + 1] - 1])


class TokenSplit(Protocol):
    """What readers use of a split: ``Split`` (a prepared domain's own files) and
    ``midtrain.data.corpora.ExternalSplit`` (pretokenized files read in place)."""

    @property
    def doc_offsets(self) -> np.ndarray: ...

    @property
    def loss_mask(self) -> np.ndarray | None: ...

    def read(self, lo: int, hi: int) -> tuple[np.ndarray, np.ndarray | None]: ...

    @property
    def num_tokens(self) -> int: ...

    @property
    def num_docs(self) -> int: ...

    @property
    def num_bytes(self) -> int: ...

    def num_blocks(self, seq_len: int) -> int: ...

    def document(self, i: int) -> np.ndarray: ...


def num_items(split: TokenSplit, seq_len: int) -> int:
    """Sequences of ``order: sequential``: item i is tokens [i(seq_len+1), (i+1)(seq_len+1))."""
    return split.num_tokens // (seq_len + 1)


def open_split(directory: Path, split: str, dtype: np.dtype) -> Split:
    """The files of one split in ``directory`` (a domain, or a prepare shard), memory-mapped."""
    mask_path = directory / f"{split}.mask"
    tokens_path = directory / f"{split}.tokens"
    has_mask = mask_path.exists()
    return Split(
        tokens=_memmap(tokens_path, dtype),
        doc_offsets=np.fromfile(directory / f"{split}.docs", dtype=np.int64),
        doc_bytes=np.fromfile(directory / f"{split}.bytes", dtype=np.int64),
        loss_mask=_memmap(mask_path, np.dtype(np.uint8)) if has_mask else None,
        tokens_path=tokens_path if tokens_path.stat().st_size else None,
        mask_path=mask_path if has_mask and mask_path.stat().st_size else None,
    )


def _read_json(path: Path, missing: str) -> dict[str, Any]:
    """A store's JSON index or manifest; ``missing`` is the one-line error when it is absent."""
    if not path.is_file():
        raise MidtrainError(missing)
    return json.loads(path.read_text())


class DomainStore:
    """A prepared domain: manifest plus memory-mapped train/val splits."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        manifest_path = self.path / "manifest.json"
        self.manifest: dict[str, Any] = _read_json(
            manifest_path, f"{manifest_path}: no prepared domain here; run `midtrain prepare` first"
        )
        self.name: str = self.manifest["name"]
        self.dtype = np.dtype(self.manifest["dtype"])
        self.order: str = self.manifest.get("order", "shuffled")
        check_sizes(self.path, self.manifest)
        self.corpus: Corpus | None = None
        if "corpus" in self.manifest:  # pretokenized files, read where they lie
            from midtrain.data.corpora import check_files
            from midtrain.data.corpora.split import corpus_from_manifest

            self.corpus = corpus_from_manifest(self.manifest)
            check_files(self.corpus, self.manifest["corpus"], self.name)

    def split(self, name: str) -> TokenSplit:
        return self._splits[name]

    @cached_property
    def _splits(self) -> dict[str, TokenSplit]:
        if self.corpus is None:
            return {s: open_split(self.path, s, self.dtype) for s in SPLITS}
        from midtrain.data.corpora import ExternalSplit

        m = self.manifest
        return {
            s: ExternalSplit(
                self.corpus, self.path, s, m["vocab_size"], m["eos_id"], m["splits"][s]["bytes"]
            )
            for s in SPLITS
        }

    @property
    def train(self) -> TokenSplit:
        return self.split("train")

    @property
    def val(self) -> TokenSplit:
        return self.split("val")


INDEX = "store.json"  # the store root's index: read and written only by StoreIndex


@dataclass(frozen=True)
class StoreIndex:
    """``<root>/store.json``: the domains of a store and the tokenizer they were encoded with.
    The one reader and writer of that file (prepare writes it, everything else reads it)."""

    domains: list[str]
    vocab_size: int
    eos_id: int
    tokenizer_hash: str
    eos: str | None = None  # the EOS token's string (stores made before it was kept: None)
    tokenizer_spec: str | None = None  # prepare's hash of its tokenizer config, for reuse
    format_version: int = FORMAT_VERSION
    bos_id: int | None = None  # the tokenizer's BOS token (None: it has none)
    add_bos: bool | None = None  # whether every document starts with it (None: not recorded)

    @staticmethod
    def exists(root: str | os.PathLike) -> bool:
        return (Path(root) / INDEX).is_file()

    @classmethod
    def read(cls, root: str | os.PathLike, any_format: bool = False) -> StoreIndex:
        """The index of the store at ``root``: a one-line error when there is none, or (unless
        ``any_format``) when it is of another store format."""
        path = Path(root) / INDEX
        data = _read_json(
            path,
            f"{root}: not a token store (no {INDEX}); "
            "run `midtrain prepare --config <yaml>` to build it",
        )
        if not any_format and data.get("format_version") != FORMAT_VERSION:
            raise MidtrainError(
                f"{path}: store format {data.get('format_version')} is not "
                f"{FORMAT_VERSION}; re-run `midtrain prepare`"
            )
        return cls(
            domains=list(data.get("domains", [])),
            vocab_size=int(data.get("vocab_size", 0)),
            eos_id=int(data.get("eos_id", -1)),
            tokenizer_hash=data.get("tokenizer_hash", ""),
            eos=data.get("eos"),
            tokenizer_spec=data.get("tokenizer_spec"),
            format_version=data.get("format_version", 0),
            bos_id=data.get("bos_id"),
            add_bos=data.get("add_bos"),
        )

    @classmethod
    def find(cls, root: str | os.PathLike) -> StoreIndex | None:
        """The index at ``root`` whatever its format (what a rebuild starts from), or None."""
        return cls.read(root, any_format=True) if cls.exists(root) else None

    def to_json(self) -> str:
        # this key order is the file's: an unchanged index is not rewritten (see write)
        return json.dumps(
            {
                "format_version": self.format_version,
                "domains": self.domains,
                "vocab_size": self.vocab_size,
                "eos_id": self.eos_id,
                "eos": self.eos,
                "tokenizer_hash": self.tokenizer_hash,
                "tokenizer_spec": self.tokenizer_spec,
                "bos_id": self.bos_id,
                "add_bos": self.add_bos,
            },
            indent=2,
        )

    def write(self, root: str | os.PathLike) -> None:
        """Atomically replace ``<root>/store.json``; left untouched when already identical."""
        path, text = Path(root) / INDEX, self.to_json()
        if path.is_file() and path.read_text() == text:
            return
        tmp = path.with_name(INDEX + ".tmp")
        tmp.write_text(text)
        os.replace(tmp, path)


class Store:
    """A store root: several domains encoded with one tokenizer."""

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)
        self.index = StoreIndex.read(self.root)
        self.domain_names: list[str] = list(self.index.domains)
        self.vocab_size: int = self.index.vocab_size
        self.eos_id: int = self.index.eos_id
        self.tokenizer_hash: str = self.index.tokenizer_hash

    def domain(self, name: str) -> DomainStore:
        if name not in self.domain_names:
            raise MidtrainError(
                f"unknown domain {name!r} in store {self.root}; "
                f"known: {', '.join(self.domain_names)}"
            )
        return self._domains[name]

    @cached_property
    def _domains(self) -> dict[str, DomainStore]:
        return {n: DomainStore(self.root / n) for n in self.domain_names}

    @property
    def tokenizer_path(self) -> Path:
        return self.root / TOKENIZER_FILE

    def fingerprint(self, domains: list[str] | None = None) -> str:
        """Identity of the data a run trains on: tokenizer plus each domain's content hash."""
        h = hashlib.sha256(self.tokenizer_hash.encode())
        for name in sorted(domains if domains is not None else self.domain_names):
            h.update(name.encode())
            h.update(self.domain(name).manifest["content_hash"].encode())
            if self.domain(name).order != "shuffled":  # the same tokens, another stream
                h.update(self.domain(name).order.encode())
        return h.hexdigest()[:16]


def expected_sizes(manifest: dict[str, Any]) -> dict[str, int]:
    """File name -> size in bytes, from the manifest (older manifests: from the counts)."""
    if "files" in manifest:
        return {name: f["bytes"] for name, f in manifest["files"].items()}
    if "splits" not in manifest:
        return {}
    itemsize = np.dtype(manifest["dtype"]).itemsize
    out = {}
    for s, n in manifest["splits"].items():
        out[f"{s}.tokens"] = n["tokens"] * itemsize
        out[f"{s}.docs"] = (n["docs"] + 1) * 8
        out[f"{s}.bytes"] = n["docs"] * 8
        if manifest.get("mask_prompt"):
            out[f"{s}.mask"] = n["tokens"]
    return out


def check_sizes(path: Path, manifest: dict[str, Any]) -> None:
    """Every file of a domain has the size its manifest says: a truncated or damaged store is
    a one-line error, not silently shorter training data. Costs one stat per file."""
    itemsize = np.dtype(manifest["dtype"]).itemsize
    for name, size in expected_sizes(manifest).items():
        f = path / name
        if not f.is_file():
            raise MidtrainError(f"{f}: missing from the store; re-run `midtrain prepare`")
        actual = f.stat().st_size
        if name.endswith(".tokens") and actual % itemsize:
            raise MidtrainError(
                f"{f}: {actual:,} bytes is not a whole number of {manifest['dtype']} tokens "
                "(odd byte length): the file is damaged; re-run `midtrain prepare`"
            )
        if actual != size:
            raise MidtrainError(
                f"{f}: {actual:,} bytes but its manifest says {size:,}: the store is truncated "
                "or damaged; re-run `midtrain prepare`"
            )


def file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
    return h.hexdigest()


def content_hash(files: dict[str, dict[str, Any]]) -> str:
    """A domain's content hash: over the sha256 of each of its files, by name."""
    h = hashlib.sha256()
    for name in sorted(files):
        h.update(f"{name}:{files[name]['sha256']}\n".encode())
    return h.hexdigest()[:16]


def verify(root: str | os.PathLike) -> list[tuple[str, str]]:
    """(domain, problem or "ok") for every domain of a store, rehashing every file; the
    files of a pretokenized domain are read whole and every token id checked."""
    store = Store(root)
    return [
        (name, _verify_domain(store.root / name, store.vocab_size)) for name in store.domain_names
    ]


def _verify_domain(path: Path, vocab_size: int) -> str:
    try:
        domain = DomainStore(path)  # sizes checked on open (a corpus: its sampled checksums)
    except MidtrainError as e:
        return str(e)
    manifest = domain.manifest
    if "files" not in manifest:
        return (
            f"{path}: made by an older midtrain without file hashes; "
            "re-run `midtrain prepare` to verify it"
        )
    bad = [
        f
        for f, entry in sorted(manifest["files"].items())
        if file_digest(path / f) != entry["sha256"]
    ]
    if bad:
        return f"{path / bad[0]}: content differs from its manifest (sha256); re-run `midtrain prepare`"
    if domain.corpus is not None:
        from midtrain.data.corpora import scan_tokens

        try:
            scan_tokens(domain.corpus, vocab_size)
        except MidtrainError as e:
            return str(e)
    return "ok"


class SplitWriter:
    """Appends documents to one split on disk; memory stays flat whatever the corpus size.

    With ``with_records`` it also writes ``<split>.records`` (int64 source record index of
    each document), which a shard of a parallel prepare needs to be merged in order."""

    def __init__(
        self,
        directory: Path,
        split: str,
        dtype: np.dtype,
        with_mask: bool,
        with_records: bool = False,
    ) -> None:
        self.dtype = dtype
        self._tokens = open(directory / f"{split}.tokens", "wb")  # noqa: SIM115
        self._docs = open(directory / f"{split}.docs", "wb")  # noqa: SIM115
        self._bytes = open(directory / f"{split}.bytes", "wb")  # noqa: SIM115
        self._mask = open(directory / f"{split}.mask", "wb") if with_mask else None  # noqa: SIM115
        self._records = (
            open(directory / f"{split}.records", "wb")  # noqa: SIM115
            if with_records
            else None
        )
        self.num_tokens = 0
        self.num_docs = 0
        self.num_bytes = 0
        np.zeros(1, dtype=np.int64).tofile(self._docs)

    def add_batch(
        self,
        tokens: np.ndarray,
        lengths: np.ndarray,
        num_bytes: list[int] | np.ndarray,
        mask: np.ndarray | None = None,
        records: list[int] | None = None,
    ) -> None:
        """Append documents given as their concatenated tokens (each ending in EOS) and their
        lengths, with one write per file."""
        if not len(lengths):
            return
        tokens.astype(self.dtype, copy=False).tofile(self._tokens)
        if self._mask is not None:
            assert mask is not None and len(mask) == len(tokens)
            mask.astype(np.uint8, copy=False).tofile(self._mask)
        if self._records is not None:
            np.asarray(records, dtype=np.int64).tofile(self._records)
        (self.num_tokens + np.cumsum(lengths, dtype=np.int64)).tofile(self._docs)
        doc_bytes = np.asarray(num_bytes, dtype=np.int64)
        doc_bytes.tofile(self._bytes)
        self.num_tokens += int(tokens.shape[0])
        self.num_docs += len(lengths)
        self.num_bytes += int(doc_bytes.sum())

    def close(self) -> None:
        for f in (self._tokens, self._docs, self._bytes, self._mask, self._records):
            if f is not None:
                f.close()
