"""A split of a pretokenized domain, read from the corpus files in place, and the check that
those files are still the ones ``midtrain prepare`` saw.

A split is a list of spans of the corpus stream (``<split>.spans``: int64 rows of (stream
offset, split offset)), so the training documents of a corpus with a validation share are read
without copying either. Every read checks its token ids against the vocabulary: exact for every
token trained or validated on, at the cost of a comparison per token.

Each file is recorded by path, size and a *sampled* sha256: its first 4 KiB (local files) and
whichever of 64 blocks of 4 KiB, spread evenly over the domain's bytes, fall in it; an index
file (``.idx``, ``index.json``) whole when under 64 MiB. Checking it costs a stat and at most
65 reads per file, whatever the corpus size.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import numpy as np

from midtrain.data.corpora.formats import Corpus, TokenFile
from midtrain.errors import MidtrainError

SAMPLES = 64
BLOCK = 4096
WHOLE_INDEX = 64 << 20


def _spread(total: int) -> np.ndarray:
    """Start offsets of the sampled blocks over ``total`` bytes (the first and the last)."""
    return np.unique(np.linspace(0, max(total - BLOCK, 0), SAMPLES).astype(np.int64))


def sample_ranges(sizes: list[int], local: bool) -> list[list[tuple[int, int]]]:
    """Per file of the given sizes, the (offset, length) ranges its checksum covers."""
    starts = np.concatenate([[0], np.cumsum(sizes, dtype=np.int64)])
    spread = _spread(int(starts[-1]))
    out = []
    for i, size in enumerate(sizes):
        mine = spread[(spread >= starts[i]) & (spread < starts[i + 1])] - starts[i]
        ranges = {(int(p), int(min(BLOCK, size - p))) for p in mine}
        if local and size:
            ranges.add((0, min(BLOCK, size)))
        out.append(sorted(ranges))
    return out


def _index_ranges(size: int) -> list[tuple[int, int]]:
    if size <= WHOLE_INDEX:
        return [(0, size)]
    return [(int(p), int(min(BLOCK, size - p))) for p in _spread(size)]


def _digest(corpus: Corpus, path: str, size: int, ranges: list[tuple[int, int]]) -> str:
    h = hashlib.sha256(str(size).encode())
    for offset, length in ranges:
        data = corpus.read_bytes(path, offset, length)
        if len(data) != length:
            raise MidtrainError(f"{path}: shorter than the {size:,} bytes it had at prepare")
        h.update(data)
    return h.hexdigest()


def _index_size(corpus: Corpus, path: str) -> int:
    if corpus.remote_files:
        return len(corpus.read_bytes(path, 0, WHOLE_INDEX))
    return Path(path).stat().st_size


def file_records(corpus: Corpus) -> dict[str, list[dict[str, Any]]]:
    """What the manifest records of the corpus files: path, size, tokens and sampled sha256 of
    every token file, and path, size and sha256 of every index file."""
    files = corpus.files
    ranges = sample_ranges([f.size for f in files], not corpus.remote_files)
    data = [
        {
            "path": f.path,
            "bytes": f.size,
            "offset": f.offset,
            "tokens": f.tokens,
            "sha256": _digest(corpus, f.path, f.size, r),
        }
        for f, r in zip(files, ranges, strict=True)
    ]
    index = []
    for path in corpus.index_files:
        size = _index_size(corpus, path)
        index.append(
            {
                "path": path,
                "bytes": size,
                "sha256": _digest(corpus, path, size, _index_ranges(size)),
            }
        )
    return {"files": data, "index": index}


def corpus_from_manifest(manifest: dict[str, Any]) -> Corpus:
    """The corpus a stored domain reads, from its manifest (no file is opened)."""
    from midtrain.data.corpora.formats import CORPORA

    spec = manifest["source"]
    files = [
        TokenFile(f["path"], f["bytes"], f["offset"], f["tokens"])
        for f in manifest["corpus"]["files"]
    ]
    index = [f["path"] for f in manifest["corpus"]["index"]]
    return CORPORA[spec["format"]](spec, files, np.dtype(manifest["dtype"]), index)


def check_files(corpus: Corpus, records: dict[str, list[dict[str, Any]]], domain: str) -> None:
    """Every file is where prepare found it, with its size and sampled content: a moved or
    changed file is one line naming it."""
    redo = f"put the prepared file back, or re-run `midtrain prepare` for domain {domain!r}"
    remote = corpus.remote_files
    ranges = sample_ranges([r["bytes"] for r in records["files"]], not remote)
    entries = [*zip(records["files"], ranges, strict=True)]
    entries += [(r, _index_ranges(r["bytes"])) for r in records["index"]]
    for record, r in entries:
        path = record["path"]
        if not remote:
            if not Path(path).is_file():
                raise MidtrainError(f"{path}: not found (moved or deleted since prepare); {redo}")
            size = Path(path).stat().st_size
            if size != record["bytes"]:
                raise MidtrainError(
                    f"{path}: {size:,} bytes, {record['bytes']:,} at prepare: the file changed; {redo}"
                )
        try:
            digest = _digest(corpus, path, record["bytes"], r)
        except MidtrainError:
            raise
        except Exception as e:  # a remote object gone or unreadable
            raise MidtrainError(
                f"{path}: cannot be read ({' '.join(str(e).split())}); {redo}"
            ) from None
        if digest != record["sha256"]:
            raise MidtrainError(
                f"{path}: its content changed since prepare (sampled sha256); {redo}"
            )


def scan_tokens(corpus: Corpus, vocab_size: int) -> None:
    """Every token of every file read and checked against the vocabulary (``--verify``)."""
    for i, f in enumerate(corpus.files):
        for lo in range(0, f.tokens, 1 << 24):
            start = int(corpus.starts[i]) + lo
            corpus.read(start, min(start + (1 << 24), int(corpus.starts[i + 1])), vocab_size)


class ExternalSplit:
    """One split of a pretokenized domain: the same reads and counts as ``store.Split``."""

    def __init__(
        self,
        corpus: Corpus,
        directory: Path,
        split: str,
        vocab_size: int,
        eos_id: int,
        num_bytes: int,
    ) -> None:
        from midtrain.data.store import _memmap

        spans = np.fromfile(directory / f"{split}.spans", dtype=np.int64).reshape(-1, 2)
        self.corpus = corpus
        self.stream_at, self.split_at = spans[:, 0].copy(), spans[:, 1].copy()
        self.doc_offsets = _memmap(directory / f"{split}.docs", np.dtype(np.int64))
        self.vocab_size, self.eos_id, self._num_bytes = vocab_size, eos_id, num_bytes
        self.loss_mask: np.ndarray | None = None

    def read(self, lo: int, hi: int) -> tuple[np.ndarray, np.ndarray | None]:
        """Tokens ``[lo, hi)`` of the split (ids checked), one pread per span and file."""
        if len(self.split_at) == 1:  # one span: no validation share cut out of it
            a = int(self.stream_at[0]) + lo
            return self.corpus.read(a, a + hi - lo, self.vocab_size), None
        parts = []
        i = int(np.searchsorted(self.split_at, lo, side="right")) - 1
        while lo < hi:
            end = int(self.split_at[i + 1]) if i + 1 < len(self.split_at) else self.num_tokens
            n = min(hi, end) - lo
            if n > 0:
                a = int(self.stream_at[i]) + lo - int(self.split_at[i])
                parts.append(self.corpus.read(a, a + n, self.vocab_size))
                lo += n
            i += 1
        return (np.concatenate(parts) if len(parts) != 1 else parts[0]), None

    @property
    def num_tokens(self) -> int:
        return int(self.doc_offsets[-1])

    @property
    def num_docs(self) -> int:
        return int(self.doc_offsets.shape[0]) - 1

    @property
    def num_bytes(self) -> int:
        return self._num_bytes

    def num_blocks(self, seq_len: int) -> int:
        return max(0, (self.num_tokens - 1) // seq_len)

    def document(self, i: int) -> np.ndarray:
        """Tokens of document i, without a trailing EOS."""
        tokens, _ = self.read(int(self.doc_offsets[i]), int(self.doc_offsets[i + 1]))
        return tokens[:-1] if len(tokens) and tokens[-1] == self.eos_id else tokens
