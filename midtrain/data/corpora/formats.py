"""The pretokenized formats a domain can be stored from, without copying a token.

A ``Corpus`` is one domain's token files in order, seen as one stream of tokens: the files'
token counts, its dtype, where its documents end, and reads of ``[lo, hi)`` of the stream (a
pread per file touched). Documents never cross a file. The formats:

* ``megatron``: ``<prefix>.bin`` + ``<prefix>.idx`` as Megatron's ``IndexedDatasetBuilder``
  writes them (index version 1, any of its dtype codes); documents from its document index.
* ``npy``: headerless little-endian ``uint16``/``uint32`` token files (OLMo, Dolma), one file,
  a glob or a list, in that order; documents end at the tokenizer's EOS (and at each file's end).
* ``litdata``: a directory (or ``s3://...`` prefix) written by ``litdata.optimize`` with its
  ``TokensLoader``; chunks in ``index.json`` order, documents are its items. Remote chunks are
  fetched whole into litdata's own cache by litdata's own downloader, then read from there.
"""

from __future__ import annotations

import glob
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from midtrain.errors import MidtrainError

FORMATS = ("megatron", "npy", "litdata")
CHUNK = 1 << 24  # index entries or tokens handled per numpy step: memory stays flat

# Megatron's index: the magic, then version (u64), dtype code (u8), sequence count (u64) and
# document count (u64); then int32 sizes, int64 pointers, int64 document indices (and, for
# multimodal data, an int8 mode per sequence). The codes are megatron-core's DType.
MEGATRON_MAGIC = b"MMIDIDX\x00\x00"
MEGATRON_HEADER = 34
MEGATRON_DTYPES = {
    1: np.uint8,
    2: np.int8,
    3: np.int16,
    4: np.int32,
    5: np.int64,
    6: np.float64,
    7: np.float32,
    8: np.uint16,
}
NPY_DTYPES = ("uint16", "uint32")


@dataclass(frozen=True)
class TokenFile:
    """One file of a corpus: ``tokens`` tokens from byte ``offset`` on."""

    path: str  # an absolute local path, or a remote URL (litdata)
    size: int
    offset: int
    tokens: int


class Corpus:
    """The files of one pretokenized domain as one token stream (see the module docstring)."""

    format = ""

    def __init__(
        self, spec: dict[str, Any], files: list[TokenFile], dtype: np.dtype, index: list[str]
    ) -> None:
        self.spec = spec
        self.files = files
        self.dtype = np.dtype(dtype)
        self.index_files = index  # files that describe the tokens (checksummed, not read)
        self.starts = np.concatenate([[0], np.cumsum([f.tokens for f in files], dtype=np.int64)])
        self._paths: list[Path] = []  # local files as Paths, made on first read

    @classmethod
    def open(cls, spec: dict[str, Any], where: str) -> Corpus:
        """The corpus of a resolved spec, every file's structure checked."""
        raise NotImplementedError

    @property
    def num_tokens(self) -> int:
        return int(self.starts[-1])

    def local_path(self, i: int) -> str:
        """File ``i`` on this machine (a remote litdata chunk: fetched into the cache first)."""
        return self.files[i].path

    def _local(self, i: int) -> Path:
        paths = self.__dict__.get("_paths")
        if paths is None or self.remote_files:
            return Path(self.local_path(i))
        if len(paths) != len(self.files):
            paths = self.__dict__["_paths"] = [Path(f.path) for f in self.files]
        return paths[i]

    def read_bytes(self, path: str, offset: int, length: int) -> bytes:
        """Raw bytes of a file of this corpus (its index files included)."""
        from midtrain.data.store import _pread

        return _pread(Path(path), length, offset)

    @property
    def remote_files(self) -> bool:
        """Whether the files are in object storage (litdata's ``s3://``...)."""
        return False

    def read(self, lo: int, hi: int, vocab_size: int | None = None) -> np.ndarray:
        """Tokens ``[lo, hi)`` of the stream: one pread per file touched. With ``vocab_size``
        every id is checked (one line naming the file) and floats become int64."""
        from midtrain.data.store import _pread

        parts = []
        i = int(np.searchsorted(self.starts, lo, side="right")) - 1
        size = self.dtype.itemsize
        while lo < hi:
            f, end = self.files[i], int(self.starts[i + 1])
            n = min(hi, end) - lo
            if n > 0:
                first = lo - int(self.starts[i])
                data = _pread(self._local(i), n * size, f.offset + first * size)
                part = np.frombuffer(data, self.dtype)
                if len(part) != n:
                    raise MidtrainError(f"{f.path}: shorter than at prepare; the file changed")
                if vocab_size is not None:
                    check_ids(part, vocab_size, f.path, first)
                    if part.dtype.kind == "f":
                        part = part.astype(np.int64)
                parts.append(part)
                lo += n
            i += 1
        if len(parts) == 1:
            return parts[0]
        return np.concatenate(parts) if parts else np.zeros(0, self.dtype)

    def document_ends(self, eos: int, vocab_size: int) -> Iterator[np.ndarray]:
        """Exclusive stream offsets where documents end, in order and in arrays of at most
        ``CHUNK``; an empty document repeats the previous end (it keeps its number)."""
        raise NotImplementedError

    @property
    def scans_every_token(self) -> bool:
        """Whether ``document_ends`` reads every token (and so checks every id)."""
        return False


def resolve_corpus_spec(spec: dict[str, Any], where: str) -> dict[str, Any]:
    """The ``source: {format: ...}`` spec checked and normalised (paths made absolute); every
    file is opened and its structure checked here, before anything is written."""
    fmt = spec.get("format")
    if fmt not in FORMATS:
        raise MidtrainError(f"{where}.format: must be one of {', '.join(FORMATS)}, got {fmt!r}")
    allowed = {"format", "path"} | {"npy": {"dtype"}, "litdata": {"cache_dir"}}.get(fmt, set())
    unknown = sorted(set(spec) - allowed)
    if unknown:
        raise MidtrainError(
            f"{where}.{unknown[0]}: not a key of a {fmt} source; its keys: {', '.join(sorted(allowed))}"
        )
    if not spec.get("path"):
        raise MidtrainError(f"{where}.path: give the {fmt} files' path")
    out = dict(spec)
    if fmt == "npy":
        if spec.get("dtype") not in NPY_DTYPES:
            raise MidtrainError(
                f"{where}.dtype: the token type of the .npy files, one of {', '.join(NPY_DTYPES)}; "
                f"got {spec.get('dtype')!r}"
            )
        paths = spec["path"] if isinstance(spec["path"], list) else [spec["path"]]
        out["path"] = [str(p) for p in paths]
    elif fmt == "megatron" or not _is_remote(str(spec["path"])):
        out["path"] = os.path.abspath(str(spec["path"]))
    open_corpus(out, where)
    return out


def open_corpus(spec: dict[str, Any], where: str = "source") -> Corpus:
    """The corpus of a resolved spec; its structure is checked (one line naming the file)."""
    return CORPORA[spec["format"]].open(spec, where)


def _is_remote(path: str) -> bool:
    return "://" in path


# -- Megatron ------------------------------------------------------------------------------------


class MegatronCorpus(Corpus):
    format = "megatron"

    @classmethod
    def open(cls, spec: dict[str, Any], where: str) -> MegatronCorpus:
        prefix = str(spec["path"])
        idx, bin_path = Path(prefix + ".idx"), Path(prefix + ".bin")
        for f in (idx, bin_path):
            if not f.is_file():
                raise MidtrainError(
                    f"{where}.path: {f} not found (a Megatron prefix names <prefix>.bin and "
                    "<prefix>.idx)"
                )
        dtype, count, docs = _megatron_header(idx)
        index = _megatron_arrays(idx, count, docs)
        itemsize = np.dtype(dtype).itemsize
        total = _megatron_check(idx, index, itemsize)
        size = bin_path.stat().st_size
        if size != total * itemsize:
            what = "truncated" if size < total * itemsize else "longer than its index says"
            raise MidtrainError(
                f"{bin_path}: {size:,} bytes but {idx.name} indexes {total:,} tokens of "
                f"{np.dtype(dtype).name} ({total * itemsize:,} bytes): the .bin is {what}; "
                "copy it again or rebuild it"
            )
        corpus = cls(spec, [TokenFile(str(bin_path), size, 0, total)], np.dtype(dtype), [str(idx)])
        corpus.index = index
        return corpus

    index: dict[str, np.ndarray]

    def document_ends(self, eos: int, vocab_size: int) -> Iterator[np.ndarray]:
        pointers, doc_idx = self.index["pointers"], self.index["documents"]
        n, itemsize = len(pointers), self.dtype.itemsize
        for lo in range(1, len(doc_idx), CHUNK):
            k = np.asarray(doc_idx[lo : lo + CHUNK])
            inner = np.asarray(pointers[np.minimum(k, n - 1)]) // itemsize
            yield np.where(k < n, inner, self.num_tokens)


def _megatron_header(idx: Path) -> tuple[type, int, int]:
    """(dtype, sequence count, document index length) from an index's header."""
    with idx.open("rb") as f:
        head = f.read(MEGATRON_HEADER)
    if len(head) < MEGATRON_HEADER or head[:9] != MEGATRON_MAGIC:
        raise MidtrainError(
            f"{idx}: unknown header {head[:9]!r} (a Megatron index starts with {MEGATRON_MAGIC!r}); "
            "give the prefix of files written by Megatron's IndexedDatasetBuilder"
        )
    (version,) = struct.unpack("<Q", head[9:17])
    if version != 1:
        raise MidtrainError(f"{idx}: index version {version}; only version 1 can be read")
    code = head[17]
    if code not in MEGATRON_DTYPES:
        raise MidtrainError(
            f"{idx}: unknown dtype code {code} (Megatron's codes are "
            f"{', '.join(map(str, MEGATRON_DTYPES))})"
        )
    count, docs = struct.unpack("<QQ", head[18:34])
    return MEGATRON_DTYPES[code], count, docs


def _megatron_arrays(idx: Path, count: int, docs: int) -> dict[str, np.ndarray]:
    """The index's arrays, memory-mapped; its length checked against its counts."""
    body = MEGATRON_HEADER + count * (4 + 8) + docs * 8
    size = idx.stat().st_size
    if size not in (body, body + count):  # + an int8 mode per sequence (multimodal)
        raise MidtrainError(
            f"{idx}: {size:,} bytes but its header counts {count:,} sequences and {docs:,} "
            f"document indices ({body:,} bytes): the index is truncated or damaged"
        )
    if docs == 0:
        raise MidtrainError(f"{idx}: the document index is empty; the index is damaged")
    mm = np.memmap(idx, dtype=np.uint8, mode="r")
    at = MEGATRON_HEADER
    sizes = mm[at : at + 4 * count].view(np.int32)
    at += 4 * count
    pointers = mm[at : at + 8 * count].view(np.int64)
    at += 8 * count
    return {
        "sizes": sizes,
        "pointers": pointers,
        "documents": mm[at : at + 8 * docs].view(np.int64),
    }


def _megatron_check(idx: Path, index: dict[str, np.ndarray], itemsize: int) -> int:
    """Tokens indexed; the sequences must lie back to back (as the builder writes them) and the
    document index must run from 0 to the sequence count."""
    sizes, pointers, doc_idx = index["sizes"], index["pointers"], index["documents"]
    n, total = len(sizes), 0
    for lo in range(0, n, CHUNK):
        s = np.asarray(sizes[lo : lo + CHUNK], dtype=np.int64)
        expected = (total + np.concatenate([[0], np.cumsum(s)[:-1]])) * itemsize
        if (s < 0).any() or not np.array_equal(np.asarray(pointers[lo : lo + CHUNK]), expected):
            raise MidtrainError(
                f"{idx}: sequences do not lie back to back in the .bin (pointers disagree with "
                "sizes); the index is damaged"
            )
        total += int(s.sum())
    first, last = int(doc_idx[0]), int(doc_idx[-1])
    steps_back = any(
        (np.diff(np.asarray(doc_idx[lo : lo + CHUNK + 1])) < 0).any()
        for lo in range(0, len(doc_idx), CHUNK)
    )
    if first != 0 or last != n or steps_back:
        raise MidtrainError(
            f"{idx}: the document index must rise from 0 to the sequence count {n:,} "
            f"(it runs {first:,} .. {last:,}); the index is damaged"
        )
    return total


# -- npy -----------------------------------------------------------------------------------------


class NpyCorpus(Corpus):
    format = "npy"

    @classmethod
    def open(cls, spec: dict[str, Any], where: str) -> NpyCorpus:
        dtype = np.dtype(spec["dtype"]).newbyteorder("<")
        files = []
        for pattern in spec["path"]:
            matches = sorted(glob.glob(pattern)) if any(c in pattern for c in "*?[") else [pattern]
            if not matches or not Path(matches[0]).is_file():
                raise MidtrainError(f"{where}.path: no file matches {pattern}")
            for m in matches:
                files.append(_npy_file(Path(m).resolve(), dtype))
        return cls(spec, files, dtype, [])

    @property
    def scans_every_token(self) -> bool:
        return True

    def document_ends(self, eos: int, vocab_size: int) -> Iterator[np.ndarray]:
        for i, f in enumerate(self.files):
            tokens = np.memmap(f.path, dtype=self.dtype, mode="r")
            start = int(self.starts[i])
            for lo in range(0, f.tokens, CHUNK):
                block = np.asarray(tokens[lo : lo + CHUNK])
                check_ids(block, vocab_size, f.path, lo)
                ends = np.flatnonzero(block == eos) + 1 + lo + start
                if lo + CHUNK >= f.tokens and (not len(ends) or ends[-1] != start + f.tokens):
                    ends = np.append(ends, start + f.tokens)  # a file ends its last document
                yield ends.astype(np.int64)


def _npy_file(path: Path, dtype: np.dtype) -> TokenFile:
    size = path.stat().st_size
    if size == 0:
        raise MidtrainError(f"{path}: an empty file; a token file holds at least one token")
    if size % dtype.itemsize:
        raise MidtrainError(
            f"{path}: {size:,} bytes is not a whole number of {dtype.name} tokens "
            f"({dtype.itemsize} bytes each): a wrong source.dtype, or a truncated file"
        )
    return TokenFile(str(path), size, 0, size // dtype.itemsize)


def check_ids(tokens: np.ndarray, vocab_size: int, path: str, at: int) -> None:
    """A token id outside ``[0, vocab_size)`` (or not a whole number) is one line naming the
    file and the token's position in it."""
    if not len(tokens):
        return
    if (
        tokens.dtype.kind in "iu"
        and tokens.max() < vocab_size
        and (tokens.dtype.kind == "u" or tokens.min() >= 0)
    ):
        return  # the common case: one pass over the block
    bad = (tokens >= vocab_size) | (tokens < 0)
    if tokens.dtype.kind == "f":
        bad |= tokens != np.floor(tokens)
    if bad.any():
        k = int(np.argmax(bad))
        raise MidtrainError(
            f"{path}: token id {tokens[k]} at token {at + k:,} is outside the tokenizer's "
            f"vocabulary of {vocab_size:,}: the files were made with another tokenizer; give "
            "that one as tokenizer.path or tokenizer.hub"
        )


# -- litdata -------------------------------------------------------------------------------------


class LitdataCorpus(Corpus):
    format = "litdata"

    @classmethod
    def open(cls, spec: dict[str, Any], where: str) -> LitdataCorpus:
        path = str(spec["path"])
        remote = _is_remote(path)
        if not remote and not (Path(path) / "index.json").is_file():
            raise MidtrainError(
                f"{where}.path: {path} has no index.json: not a directory written by "
                "litdata.optimize"
            )
        config = _chunks_config(path, spec.get("cache_dir"), where)
        index = config.config
        if index.get("item_loader") != "TokensLoader":
            raise MidtrainError(
                f"{path}: written with item loader {index.get('item_loader')!r}; midtrain reads "
                "chunks of token arrays: optimize with item_loader=TokensLoader()"
            )
        if index.get("compression"):
            raise MidtrainError(
                f"{path}: compressed chunks ({index['compression']}) are not read in place; "
                "optimize without compression"
            )
        dtype = _litdata_dtype(index["data_format"][0], path)
        base = path.rstrip("/") if remote else os.path.abspath(path)
        files = [
            TokenFile(
                f"{base}/{c['filename']}",
                int(c["chunk_bytes"]),
                (2 + int(c["chunk_size"])) * 4,
                int(c["dim"]),
            )
            for c in config._chunks
        ]
        corpus = cls(spec, files, dtype, [f"{base}/index.json"])
        corpus._config = (os.getpid(), config)
        return corpus

    _config: tuple[int, Any] | None = None

    @property
    def remote_files(self) -> bool:
        return _is_remote(str(self.spec["path"]))

    def _chunks(self) -> Any:
        """litdata's ``ChunksConfig`` of this process (its downloader is not shared across a
        fork)."""
        if self._config is None or self._config[0] != os.getpid():
            self._config = (
                os.getpid(),
                _chunks_config(self.spec["path"], self.spec.get("cache_dir")),
            )
        return self._config[1]

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_config": None}

    def local_path(self, i: int) -> str:
        if not self.remote_files:
            return self.files[i].path
        config = self._chunks()
        local = os.path.join(config._cache_dir, config._chunks[i]["filename"])
        if not os.path.exists(local):
            config.download_chunk_from_index(i, skip_lock=True)
        return local

    def read_bytes(self, path: str, offset: int, length: int) -> bytes:
        if not self.remote_files:
            return super().read_bytes(path, offset, length)
        if path.endswith("/index.json"):
            data = Path(self._chunks()._cache_dir, "index.json").read_bytes()
            return data[offset : offset + length]
        i = [f.path for f in self.files].index(path)
        return bytes(self._chunks().download_chunk_bytes_from_index(i, offset, length))

    def document_ends(self, eos: int, vocab_size: int) -> Iterator[np.ndarray]:
        """Documents are litdata's items: the offset table at the head of each chunk."""
        for i, f in enumerate(self.files):
            head = np.frombuffer(self.read_bytes(f.path, 0, f.offset), dtype=np.uint32)
            count = f.offset // 4 - 2
            end = f.offset + f.tokens * self.dtype.itemsize
            if int(head[0]) != count or int(head[1]) != f.offset or int(head[-1]) != end:
                raise MidtrainError(
                    f"{f.path}: its header does not match index.json ({count} items, "
                    f"{f.tokens} tokens); the chunk is damaged or from another optimize run"
                )
            bounds = (head[2:].astype(np.int64) - f.offset) // self.dtype.itemsize
            yield bounds + int(self.starts[i])


CORPORA: dict[str, type[Corpus]] = {
    "megatron": MegatronCorpus,
    "npy": NpyCorpus,
    "litdata": LitdataCorpus,
}


def _chunks_config(path: str, cache_dir: str | None, where: str = "source") -> Any:
    """litdata's own reader of an optimized dataset's ``index.json``: the chunks in order, and
    for a remote path the downloader that fetches them into litdata's cache."""
    try:
        from litdata.streaming.config import ChunksConfig
        from litdata.streaming.item_loader import TokensLoader
        from litdata.streaming.serializers import _get_serializers
        from litdata.utilities.dataset_utilities import _try_create_cache_dir
    except ImportError:
        raise MidtrainError(
            f"{where}: format litdata needs the litdata package: pip install 'midtrain[corpora]'"
        ) from None
    remote = _is_remote(path)
    try:
        local = _try_create_cache_dir(path, cache_dir) if remote else path
        config = ChunksConfig.load(
            local, _get_serializers(None), path if remote else None, TokensLoader(block_size=1)
        )
    except MidtrainError:
        raise
    except Exception as e:  # a missing object, refused credentials, a bad index: one line
        cause = " ".join(str(e).split()) or type(e).__name__
        raise MidtrainError(f"{where}.path: could not read {path}/index.json ({cause})") from None
    if config is None:
        raise MidtrainError(
            f"{where}.path: {path} has no index.json: not a directory written by litdata.optimize"
        )
    return config


def _litdata_dtype(data_format: str, path: str) -> np.dtype:
    from litdata.constants import _NUMPY_DTYPES_MAPPING, _TORCH_DTYPES_MAPPING

    name, _, code = data_format.partition(":")
    if name == "no_header_numpy":
        dtype = np.dtype(_NUMPY_DTYPES_MAPPING[int(code)])
    elif name == "no_header_tensor":
        import torch

        dtype = torch.empty(0, dtype=_TORCH_DTYPES_MAPPING[int(code)]).numpy().dtype
    else:
        raise MidtrainError(
            f"{path}: data format {data_format!r} is not a token array; optimize with "
            "item_loader=TokensLoader() and return numpy arrays or tensors of token ids"
        )
    if dtype.kind not in "iu":
        raise MidtrainError(f"{path}: tokens of type {dtype.name}; token ids are integers")
    return dtype
