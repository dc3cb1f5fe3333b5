"""Documents to store files: tokenize each batch of a domain's documents and append it to the
train/val ``SplitWriter``s; with ``num_proc`` > 1, one local process per shard of the batches
(merged afterwards by :mod:`midtrain.data.prepare.shards`)."""

from __future__ import annotations

import multiprocessing
import os
import queue
import shutil
from collections.abc import Callable
from concurrent.futures import Future, ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import Tokenizer

from midtrain.data.prepare.config import PrepareConfig
from midtrain.data.prepare.plan import Plan
from midtrain.data.prepare.render import Document, rendered, validation_split
from midtrain.data.prepare.shards import merge_shards
from midtrain.data.prepare.tokenizer import chat_encoder, encoder
from midtrain.data.store import SPLITS, SplitWriter, token_dtype

Progress = Callable[[int, int], None]  # (documents, tokens) of a batch just written
# encode_shard's arguments before ``progress``: what a pool worker is sent
_Job = tuple[Plan, str, int, int, int, Path, int, int]


class _SplitBatch:
    """One batch's documents of one split, gathered as ``SplitWriter.add_batch`` takes them."""

    def __init__(self, eos: int, with_mask: bool, prefix: list[int]) -> None:
        self.eos, self.with_mask, self.prefix = eos, with_mask, prefix
        self.ids: list[int] = []
        self.lengths: list[int] = []
        self.bytes: list[int] = []
        self.records: list[int] = []
        self.flags: list[int] = []  # with a mask: per segment (and the EOS), trained or not
        self.runs: list[int] = []  # ... and its length in tokens

    def add(self, record: int, segments: list[tuple[str, bool]], pieces: list[list[int]]) -> int:
        """Append a document: the prefix (BOS), its segments' token ids, then EOS; returns
        its length."""
        self.ids += self.prefix
        n = 1 + len(self.prefix)
        for piece in pieces:
            self.ids += piece
            n += len(piece)
        self.ids.append(self.eos)
        self.lengths.append(n)
        self.bytes.append(sum(len(t.encode("utf-8")) for t, _ in segments))
        self.records.append(record)
        if self.with_mask:  # the prefix is context: nothing predicts a document's BOS
            self.flags += [0] + [int(train) for _, train in segments] + [1]
            self.runs += [len(self.prefix)] + [len(piece) for piece in pieces] + [1]
        return n

    def write(self, writer: SplitWriter) -> None:
        mask = (
            np.repeat(np.array(self.flags, dtype=np.uint8), self.runs) if self.with_mask else None
        )
        writer.add_batch(
            np.array(self.ids, dtype=writer.dtype),
            np.array(self.lengths, dtype=np.int64),
            self.bytes,
            mask,
            self.records,
        )


class _Encoder:
    """Tokenizes a domain's batches into its writers, stopping at ``max_tokens``."""

    def __init__(self, plan: Plan, tokenizer_json: str, eos: int, seed: int) -> None:
        tok = Tokenizer.from_str(tokenizer_json)
        self.encode, self.eos = encoder(tok), eos
        # a chat template's rendering is tokenized whole (special tokens parsed), and it
        # writes the BOS itself where the model wants one (Llama 3's {{ bos_token }})
        self.chat = plan.template.renderer is not None
        self.encode_chat = chat_encoder(Tokenizer.from_str(tokenizer_json)) if self.chat else None
        self.prefix = [] if self.chat else list(plan.prefix)
        self.dtype = token_dtype(tok.get_vocab_size())
        self.with_mask = plan.template.has_context and plan.config.mask_prompt
        self.in_val = validation_split(plan.config.val_fraction, seed)
        self.max_tokens = plan.config.max_tokens
        self.tokens, self.last_kept = 0, -1

    @property
    def capped(self) -> bool:
        return self.max_tokens is not None and self.tokens >= self.max_tokens

    def batch(self, docs: list[Document], writers: dict[str, SplitWriter]) -> tuple[int, int]:
        """Encode and write one batch; (documents, tokens) written."""
        if self.encode_chat is not None:
            per_doc = self.encode_chat([[t for t, _ in segs] for _, segs in docs])
            flat = [piece for pieces in per_doc for piece in pieces]
        else:
            flat = self.encode([t for _, segs in docs for t, _ in segs])
        groups = {s: _SplitBatch(self.eos, self.with_mask, self.prefix) for s in SPLITS}
        k, n_docs, before = 0, 0, self.tokens
        for i, segments in docs:
            pieces = flat[k : k + len(segments)]
            k += len(segments)
            self.tokens += groups["val" if self.in_val(i) else "train"].add(i, segments, pieces)
            self.last_kept, n_docs = i, n_docs + 1
            if self.capped:
                break
        for s, g in groups.items():
            g.write(writers[s])
        return n_docs, self.tokens - before


def encode_shard(
    plan: Plan,
    tokenizer_json: str,
    eos: int,
    seed: int,
    batch_size: int,
    out: Path,
    index: int = 0,
    count: int = 1,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Encode shard ``index`` of ``count`` of a domain into ``out``: the store files of each
    split (plus ``.records``, and ``skipped.records``, when ``count`` > 1). With count 1 this
    is the whole domain. Caps apply to the shard's own documents: a superset of what the
    merged domain keeps from it. ``progress`` hears of every batch written."""
    enc = _Encoder(plan, tokenizer_json, eos, seed)
    out.mkdir(parents=True)
    writers = {
        s: SplitWriter(out, s, enc.dtype, enc.with_mask, with_records=count > 1) for s in SPLITS
    }
    skipped: list[int] = []
    try:
        for docs, batch_skipped in rendered(plan, batch_size, index, count):
            skipped += batch_skipped
            done = enc.batch(docs, writers)
            if progress is not None:
                progress(*done)
            if enc.capped:
                break
    finally:
        for w in writers.values():
            w.close()
    max_docs = plan.config.max_docs
    if enc.capped or (
        max_docs is not None and sum(w.num_docs for w in writers.values()) >= max_docs
    ):
        skipped = [i for i in skipped if i < enc.last_kept]  # records past the cap were not needed
    if count > 1:
        np.array(skipped, dtype=np.int64).tofile(out / "skipped.records")
    return {
        "splits": {
            s: {"docs": w.num_docs, "tokens": w.num_tokens, "bytes": w.num_bytes}
            for s, w in writers.items()
        },
        "skipped": len(skipped),
        "with_mask": enc.with_mask,
        "dtype": enc.dtype.name,
    }


_PROGRESS: Any = None  # in a pool worker: the queue to the main process's progress bar


def _worker_init(progress: Any) -> None:
    global _PROGRESS
    # one process per core already: the tokenizer's own thread pool would oversubscribe
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _PROGRESS = progress


def _report(docs: int, tokens: int) -> None:
    _PROGRESS.put((docs, tokens))


def _encode_job(args: _Job) -> dict[str, Any]:
    try:
        return encode_shard(*args, progress=_report)
    finally:
        _PROGRESS.put(None)  # this job is over (done or failed): stop waiting for it


def _follow(futures: list[Future], reports: Any, progress: Progress | None) -> None:
    """Pass the workers' batch reports on as they come, until every job is over (or one
    died without saying so: its future then holds the error)."""
    left = len(futures)
    while left:
        try:
            item = reports.get(timeout=0.5)
        except queue.Empty:
            if any(f.done() and f.exception() is not None for f in futures):
                return
            continue
        if item is None:
            left -= 1
        elif progress is not None:
            progress(*item)


class Builder:
    """Builds domains with ``num_proc`` local processes (one pool for every domain)."""

    def __init__(self, config: PrepareConfig, tok: Tokenizer, eos: int, processes: int) -> None:
        self.config, self.eos, self.processes = config, eos, processes
        self.tokenizer_json = tok.to_str()
        self.dtype = token_dtype(tok.get_vocab_size())
        self.pool: ProcessPoolExecutor | None = None
        if processes > 1:
            # fork, as `datasets.map(num_proc=...)` does: workers start in milliseconds
            # (spawn would re-import datasets in each, seconds per worker)
            methods = multiprocessing.get_all_start_methods()
            context = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
            self.reports = context.Queue()  # workers' batch reports, for the progress bar
            self.pool = ProcessPoolExecutor(
                processes, mp_context=context, initializer=_worker_init, initargs=(self.reports,)
            )

    def _args(self, plan: Plan, out: Path, index: int = 0, count: int = 1) -> _Job:
        c = self.config
        return (plan, self.tokenizer_json, self.eos, c.seed, c.batch_size, out, index, count)

    def shard(
        self, plan: Plan, out: Path, index: int, count: int, progress: Progress | None = None
    ) -> dict[str, Any]:
        return encode_shard(*self._args(plan, out, index, count), progress=progress)

    def build(self, plan: Plan, out: Path, progress: Progress | None = None) -> dict[str, Any]:
        """The domain's store files in ``out``: in this process, or sharded over the pool
        and merged (the same bytes)."""
        if self.pool is None:
            return encode_shard(*self._args(plan, out), progress=progress)
        n = self.processes
        parts = out.parent / f"{out.name}.parts"
        futures = [
            self.pool.submit(_encode_job, self._args(plan, parts / str(i), i, n)) for i in range(n)
        ]
        _follow(futures, self.reports, progress)
        results = [f.result() for f in futures]
        merged = merge_shards(
            plan,
            [parts / str(i) for i in range(n)],
            out,
            self.config.batch_size,
            self.dtype,
            results[0]["with_mask"],
        )
        shutil.rmtree(parts)
        return merged

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(cancel_futures=True)
            self.reports.close()
