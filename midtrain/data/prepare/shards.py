"""Shards of a domain and their merge. Shard ``i`` of ``N`` holds the record batches whose
number is ``i`` modulo ``N``, with the source record index of every document; the merge
interleaves them batch by batch in record order and applies the caps as one process would,
writing through the store's own ``SplitWriter``: the very bytes of a 1-process build. Local
workers (``num_proc``) and nodes (``--shard i/N``, then ``--merge``) both end here."""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from midtrain.data.prepare.plan import SHARDS, Plan
from midtrain.data.store import SPLITS, Split, SplitWriter, open_split
from midtrain.errors import MidtrainError


@dataclass
class _Part:
    """One split of one shard, and how far the merge has read it."""

    split: Split
    records: np.ndarray  # source record index of each document
    cursor: int = 0

    @property
    def done(self) -> bool:
        return self.cursor >= len(self.records)

    def end_before(self, record: int) -> int:
        """Index past this part's next documents with a record index below ``record``."""
        return self.cursor + int(np.searchsorted(self.records[self.cursor :], record))

    def lengths(self, end: int) -> np.ndarray:
        return np.diff(self.split.doc_offsets[self.cursor : end + 1])

    def copy_to(self, writer: SplitWriter, end: int) -> None:
        """Documents [cursor, end) appended to ``writer``."""
        if end > self.cursor:
            s, lo, hi = self.split, self.split.doc_offsets[self.cursor], self.split.doc_offsets[end]
            writer.add_batch(
                np.asarray(s.tokens[lo:hi]),
                self.lengths(end),
                s.doc_bytes[self.cursor : end],
                None if s.loss_mask is None else np.asarray(s.loss_mask[lo:hi]),
            )
        self.cursor = end


class _Caps:
    """``max_docs`` / ``max_tokens`` over the merged documents, in source record order."""

    def __init__(self, max_docs: int | None, max_tokens: int | None) -> None:
        self.max_docs, self.max_tokens = max_docs, max_tokens
        self.kept, self.tokens, self.last_kept, self.reached = 0, 0, -1, False

    def apply(self, parts: dict[str, _Part], ends: dict[str, int]) -> dict[str, int]:
        """The ends of one batch's documents per split, cut where a cap is reached."""
        if self.max_docs is None and self.max_tokens is None:
            return ends
        records = np.concatenate([p.records[p.cursor : ends[s]] for s, p in parts.items()])
        lengths = np.concatenate([p.lengths(ends[s]) for s, p in parts.items()])
        split_of = np.concatenate(
            [np.full(ends[s] - p.cursor, k) for k, (s, p) in enumerate(parts.items())]
        )
        order = np.argsort(records, kind="stable")
        keep = len(order)
        if self.max_docs is not None and self.kept + keep >= self.max_docs:
            keep, self.reached = self.max_docs - self.kept, True
        if self.max_tokens is not None:
            cum = self.tokens + np.cumsum(lengths[order])
            cross = int(np.searchsorted(cum, self.max_tokens))  # first cum >= cap
            if cross < keep:
                keep, self.reached = cross + 1, True
        if keep:
            self.last_kept = int(records[order[keep - 1]])
        self.kept += keep
        self.tokens += int(lengths[order[:keep]].sum())
        return {
            s: p.cursor + int((split_of[order[:keep]] == k).sum())
            for k, (s, p) in enumerate(parts.items())
        }


def merge_shards(
    plan: Plan, shards: list[Path], out: Path, batch_size: int, dtype: np.dtype, with_mask: bool
) -> dict[str, Any]:
    """Interleave shard outputs batch by batch in source record order, applying the domain's
    caps exactly as one process would: the result is byte-identical to a 1-process build."""
    parts = [
        {
            s: _Part(open_split(p, s, dtype), np.fromfile(p / f"{s}.records", dtype=np.int64))
            for s in SPLITS
        }
        for p in shards
    ]
    caps = _Caps(plan.config.max_docs, plan.config.max_tokens)
    out.mkdir(parents=True)
    writers = {s: SplitWriter(out, s, dtype, with_mask) for s in SPLITS}
    try:
        b = 0
        while not caps.reached and not all(p.done for shard in parts for p in shard.values()):
            shard = parts[b % len(parts)]  # batch b is in shard b mod N
            ends = {s: p.end_before((b + 1) * batch_size) for s, p in shard.items()}
            for s, end in caps.apply(shard, ends).items():
                shard[s].copy_to(writers[s], end)
            b += 1
    finally:
        for w in writers.values():
            w.close()
    skipped = np.concatenate([np.fromfile(p / "skipped.records", dtype=np.int64) for p in shards])
    return {
        "splits": {
            s: {"docs": w.num_docs, "tokens": w.num_tokens, "bytes": w.num_bytes}
            for s, w in writers.items()
        },
        "skipped": int((skipped < caps.last_kept).sum()) if caps.reached else len(skipped),
        "with_mask": with_mask,
        "dtype": dtype.name,
    }


def shard_dirs(root: Path, plan: Plan, batch_size: int) -> list[Path]:
    """The complete, matching set of ``--shard i/N`` outputs of a domain (checked up front)."""
    folder = root / SHARDS / plan.name
    found = {}
    for p in sorted(folder.iterdir()) if folder.is_dir() else []:
        m = re.fullmatch(r"(\d+)-of-(\d+)", p.name)
        if m:
            found[int(m[1]), int(m[2])] = p
    run = "run `midtrain prepare --config <yaml> --shard i/N` for every i in 0..N-1 first"
    if not found:
        raise MidtrainError(f"{plan.where}: no shards in {folder}; {run}")
    counts = sorted({n for _, n in found})
    if len(counts) > 1:
        raise MidtrainError(
            f"{folder}: shards of different counts ({counts}); "
            "delete the stale ones and re-run them"
        )
    n = counts[0]
    missing = [str(i) for i in range(n) if (i, n) not in found]
    if missing:
        raise MidtrainError(f"{folder}: shard(s) {', '.join(missing)} of {n} missing; {run}")
    dirs = [found[i, n] for i in range(n)]
    for d in dirs:
        meta = json.loads((d / "shard.json").read_text())
        if meta["fingerprint"] != plan.fingerprint or meta["batch_size"] != batch_size:
            raise MidtrainError(
                f"{d}: made from a different source, config or tokenizer; re-run this shard"
            )
    return dirs


def merge_domain(plan: Plan, dirs: list[Path], out: Path, batch_size: int) -> dict[str, Any]:
    """``--merge``: the domain built from its complete shard set (see :func:`shard_dirs`)."""
    first = json.loads((dirs[0] / "shard.json").read_text())
    return merge_shards(plan, dirs, out, batch_size, np.dtype(first["dtype"]), first["with_mask"])


def shard_done(root: Path, plan: Plan, index: int, count: int) -> bool:
    meta = root / SHARDS / plan.name / f"{index}-of-{count}" / "shard.json"
    return meta.is_file() and json.loads(meta.read_text())["fingerprint"] == plan.fingerprint


def write_shard(
    root: Path,
    plan: Plan,
    index: int,
    count: int,
    batch_size: int,
    encode: Callable[[Path], dict[str, Any]],
) -> dict[str, Any]:
    """Shard ``index`` of ``count`` of a domain, encoded by ``encode`` into a temporary folder
    renamed into place when complete: a killed shard leaves nothing to mistake for done."""
    folder = root / SHARDS / plan.name
    target = folder / f"{index}-of-{count}"
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".tmp-{index}-of-{count}-{os.getpid()}"
    try:
        result = encode(tmp)
        meta = {"fingerprint": plan.fingerprint, "index": index, "count": count}
        (tmp / "shard.json").write_text(
            json.dumps({**meta, "batch_size": batch_size, **result}, indent=2)
        )
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return result
