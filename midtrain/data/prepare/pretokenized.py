"""A domain from pretokenized files (``source: {format: megatron|npy|litdata, ...}``): no token
is copied or re-tokenized. The store gets the document offsets of each split (``.docs``), the
spans of the corpus stream each split reads (``.spans``) and a manifest recording every file
by path, size and sampled checksum (``midtrain.data.corpora.split``).

Documents are numbered in corpus order and split into train and validation as records of a
text domain are (``validation_split``); ``max_docs`` and ``max_tokens`` cap them as for text.
The validation split's bytes per token (for bits per byte) are measured by decoding its first
``BYTES_SAMPLE`` tokens' documents with the store's tokenizer."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import IO, Any

import numpy as np
from tokenizers import Tokenizer

from midtrain.data.corpora import Corpus, ExternalSplit, file_records, open_corpus
from midtrain.data.corpora.split import BLOCK, _spread
from midtrain.data.prepare.plan import Plan
from midtrain.data.prepare.render import validation_mask
from midtrain.data.store import SPLITS
from midtrain.errors import MidtrainError

BYTES_SAMPLE = 1 << 24  # validation tokens decoded to measure bytes per token


def corpus_identity(spec: dict[str, Any]) -> str:
    """What a rebuild depends on beyond the spec: every file's path, size and mtime (a remote
    corpus: its index.json), as local text files are identified."""
    corpus = open_corpus(spec)
    h = hashlib.sha256(json.dumps(spec, sort_keys=True).encode())
    if corpus.remote_files:
        h.update(corpus.read_bytes(corpus.index_files[0], 0, 1 << 30))
    for path in [f.path for f in corpus.files] + corpus.index_files:
        if not corpus.remote_files:
            st = Path(path).stat()
            h.update(f"{path}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


class _SplitIndex:
    """The ``.docs`` and ``.spans`` files of one split, appended chunk by chunk."""

    def __init__(self, out: Path, split: str) -> None:
        self._docs: IO[bytes] = open(out / f"{split}.docs", "wb")  # noqa: SIM115
        self._spans: IO[bytes] = open(out / f"{split}.spans", "wb")  # noqa: SIM115
        np.zeros(1, dtype=np.int64).tofile(self._docs)
        self.tokens, self.docs, self.last_end = 0, 0, -1

    def add(self, starts: np.ndarray, ends: np.ndarray) -> None:
        """Documents ``[starts[k], ends[k])`` of the corpus stream, in order."""
        if not len(starts):
            return
        lengths = ends - starts
        offsets = self.tokens + np.cumsum(lengths)
        offsets.tofile(self._docs)
        gap = np.concatenate([[starts[0] != self.last_end], starts[1:] != ends[:-1]])
        spans = np.stack([starts[gap], (offsets - lengths)[gap]], axis=1).astype(np.int64)
        spans.tofile(self._spans)
        self.tokens, self.docs, self.last_end = (
            int(offsets[-1]),
            self.docs + len(starts),
            int(ends[-1]),
        )

    def close(self) -> None:
        self._docs.close()
        self._spans.close()


class _Caps:
    """``max_docs`` (non-empty documents) and ``max_tokens`` over the corpus, in order."""

    def __init__(self, max_docs: int | None, max_tokens: int | None) -> None:
        self.max_docs, self.max_tokens = max_docs, max_tokens
        self.docs, self.tokens, self.reached = 0, 0, False

    def keep(self, lengths: np.ndarray) -> int:
        """How many of these documents are kept (the one that reaches a cap included)."""
        n = len(lengths)
        if self.max_docs is not None:
            docs = np.cumsum(lengths > 0)
            n = min(n, int(np.searchsorted(docs, self.max_docs - self.docs)) + 1)
        if self.max_tokens is not None:
            tokens = np.cumsum(lengths)
            n = min(n, int(np.searchsorted(tokens, self.max_tokens - self.tokens)) + 1)
        self.docs += int((lengths[:n] > 0).sum())
        self.tokens += int(lengths[:n].sum())
        self.reached = n < len(lengths) or self.full
        return n

    @property
    def full(self) -> bool:
        return (self.max_docs is not None and self.docs >= self.max_docs) or (
            self.max_tokens is not None and self.tokens >= self.max_tokens
        )


def _check_samples(corpus: Corpus, vocab_size: int) -> None:
    """The token ids of the checksum's sampled blocks (all of them where ``document_ends``
    reads every token anyway)."""
    if corpus.scans_every_token:
        return
    per = max(1, BLOCK // corpus.dtype.itemsize)
    for at in _spread(corpus.num_tokens * corpus.dtype.itemsize) // corpus.dtype.itemsize:
        corpus.read(int(at), min(int(at) + per, corpus.num_tokens), vocab_size)


def _split_documents(
    plan: Plan, corpus: Corpus, out: Path, eos: int, vocab: int, seed: int
) -> tuple[dict[str, _SplitIndex], int]:
    """Every document of the corpus to its split's index files; (the indexes, empty docs)."""
    index = {s: _SplitIndex(out, s) for s in SPLITS}
    caps = _Caps(plan.config.max_docs, plan.config.max_tokens)
    first, previous, empty = 0, 0, 0
    try:
        for ends in corpus.document_ends(eos, vocab):
            starts = np.concatenate([[previous], ends[:-1]])
            n = caps.keep(ends - starts)
            ends, starts = ends[:n], starts[:n]
            val = validation_mask(plan.config.val_fraction, seed, first + np.arange(n))
            real = ends > starts
            empty += int((~real).sum())
            for s, sel in (("train", ~val & real), ("val", val & real)):
                index[s].add(starts[sel], ends[sel])
            first, previous = first + n, int(ends[-1]) if n else previous
            if caps.reached:
                break
    finally:
        for x in index.values():
            x.close()
    return index, empty


def _val_bytes(corpus: Corpus, out: Path, tok: Tokenizer, eos: int, vocab: int) -> tuple[int, int]:
    """(UTF-8 bytes, tokens) of the validation documents in its first ``BYTES_SAMPLE`` tokens."""
    split = ExternalSplit(corpus, out, "val", vocab, eos, 0)
    offsets = np.asarray(split.doc_offsets)
    n = int(np.searchsorted(offsets, BYTES_SAMPLE, side="left"))
    n = max(1, min(n, split.num_docs)) if split.num_docs else 0
    texts = [split.document(i).tolist() for i in range(n)]
    decoded = tok.decode_batch(texts, skip_special_tokens=False) if texts else []
    return sum(len(t.encode("utf-8")) for t in decoded), int(offsets[n])


def build_pretokenized(
    plan: Plan, out: Path, tok: Tokenizer, eos: int, seed: int
) -> dict[str, Any]:
    """The domain's index files in ``out``; its counts and file records, as the manifest takes
    them. Token ids outside the vocabulary are refused in one line naming the file."""
    corpus = open_corpus(plan.source, f"{plan.where}.source")
    vocab = tok.get_vocab_size()
    _check_samples(corpus, vocab)
    out.mkdir(parents=True)
    index, empty = _split_documents(plan, corpus, out, eos, vocab, seed)
    if index["train"].docs + index["val"].docs == 0:
        raise MidtrainError(f"{plan.where}: empty domain: the files hold no tokens")
    val_bytes, measured = _val_bytes(corpus, out, tok, eos, vocab)
    per_token = val_bytes / measured if measured else 0.0
    splits = {
        s: {
            "docs": x.docs,
            "tokens": x.tokens,
            # bytes of the whole split, from the measured share (train: not measured)
            "bytes": round(per_token * x.tokens) if s == "val" else 0,
        }
        for s, x in index.items()
    }
    splits["val"]["bytes_measured_tokens"] = measured
    return {
        "splits": splits,
        "skipped": empty,
        "with_mask": False,
        "dtype": corpus.dtype.name,
        "corpus": file_records(corpus),
        "vocab_size": vocab,
    }
