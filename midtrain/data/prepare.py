"""``midtrain prepare``: render, tokenize and store every domain of a prepare config.

Everything that can be wrong with the input is checked before anything is written; a rebuild
happens in temporary directories swapped in only when every domain has succeeded, so a failed
run leaves an existing store exactly as it was.

Parallel and multi-node preparation: shard ``i`` of ``N`` encodes the record batches whose
number is ``i`` modulo ``N`` (batches of ``batch_size`` source records) and writes them with the
source record index of every document; merging the shards in record order gives the very bytes
a single process writes (same documents, order, split, caps and manifest). ``num_proc`` runs the
shards as local processes; ``--shard i/N`` on N machines, then ``--merge``, does the same across
nodes.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from fractions import Fraction
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import Tokenizer
from tqdm import tqdm

from midtrain.data.sources import Template, record_batches, resolve_source, source_fingerprint
from midtrain.data.store import (
    FORMAT_VERSION,
    SPLITS,
    SplitWriter,
    check_sizes,
    content_hash,
    file_digest,
    token_dtype,
)
from midtrain.data.tokenizer import (
    DEFAULT_EOS,
    eos_id,
    load_tokenizer,
    tokenizer_hash,
    train_bpe,
)
from midtrain.errors import MidtrainError

_DOMAIN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
SHARDS = ".shards"  # under the store root: the output of `--shard i/N` runs until `--merge`


@dataclass
class TrainTokenizerConfig:
    """Train a byte-level BPE on the first ``sample_docs`` documents of every domain."""

    vocab_size: int = 8192
    sample_docs: int = 2000
    min_frequency: int = 2


@dataclass
class TokenizerConfig:
    """Exactly one of ``path`` (a tokenizer.json), ``hub`` (a hub name) or ``train``."""

    path: str | None = None
    hub: str | None = None
    train: TrainTokenizerConfig | None = None
    eos: str = DEFAULT_EOS


@dataclass(kw_only=True)
class DomainConfig(Template):
    """One named domain: a template (the fields of :class:`Template`: ``text``; or ``prompt`` +
    ``response``; or ``chat``, ``chat_turn``, ``train_roles``) applied to a source.

    source: ``datasets.load_dataset`` keyword arguments (``path`` may be a local .jsonl/.json/
      .parquet/.csv/.txt file), or ``{builtin: python-docs|python-stdlib|arithmetic, ...}``.
    mask_prompt: give context tokens (the prompt; chat turns of other roles) loss-mask 0.
    val_fraction: this share of documents, evenly spaced, goes to validation (1.0 = eval-only).
    max_docs / max_tokens: stop after this many documents / tokens (useful with streaming).
    """

    source: dict[str, Any]
    mask_prompt: bool = True
    val_fraction: float = 0.05
    max_docs: int | None = None
    max_tokens: int | None = None


@dataclass
class PrepareConfig:
    output: str
    domains: dict[str, DomainConfig]
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    seed: int = 0
    batch_size: int = 1000
    num_proc: int = 1


@dataclass
class _Plan:
    name: str
    config: DomainConfig
    source: dict[str, Any]
    template: Template
    fingerprint: str = ""

    @property
    def where(self) -> str:
        return f"domains.{self.name}"


def _check(config: PrepareConfig) -> list[_Plan]:
    if not config.domains:
        raise MidtrainError("domains: the prepare config names no domains")
    tk = config.tokenizer
    if sum(x is not None for x in (tk.path, tk.hub, tk.train)) != 1:
        raise MidtrainError("tokenizer: give exactly one of `path`, `hub` or `train`")
    if tk.train is not None and tk.train.vocab_size < 257:
        raise MidtrainError("tokenizer.train.vocab_size: must be at least 257 (bytes + EOS)")
    if config.num_proc < 1:
        raise MidtrainError(f"num_proc: must be at least 1, got {config.num_proc}")
    if config.batch_size < 1:
        raise MidtrainError(f"batch_size: must be at least 1, got {config.batch_size}")
    plans = []
    for name, d in config.domains.items():
        where = f"domains.{name}"
        if not _DOMAIN_NAME.match(name):
            raise MidtrainError(f"{where}: domain names use letters, digits, '_', '-', '.'")
        if not 0.0 <= d.val_fraction <= 1.0:
            raise MidtrainError(f"{where}.val_fraction: must be in [0, 1], got {d.val_fraction}")
        for cap in ("max_docs", "max_tokens"):
            if getattr(d, cap) is not None and getattr(d, cap) <= 0:
                raise MidtrainError(f"{where}.{cap}: must be positive")
        plans.append(_Plan(name, d, resolve_source(d.source, f"{where}.source"), d.template()))
    return plans


def _rendered(
    plan: _Plan,
    batch_size: int,
    index: int = 0,
    count: int = 1,
) -> Iterator[tuple[list[tuple[int, list[tuple[str, bool]]]], list[int]]]:
    """Per batch of source records (those of shard ``index`` of ``count``): the documents as
    (record index, segments) and the indices of records skipped as empty or whitespace-only.
    ``max_docs`` counts kept documents of this shard."""
    kept = 0
    first = True
    for start, records in record_batches(
        plan.source, f"{plan.where}.source", batch_size, index, count
    ):
        if first and records:
            plan.template.check(records[0], plan.where)
            first = False
        docs, skipped = [], []
        for k, rec in enumerate(records):
            plan.template.check_values(rec, plan.where, start + k)
            segments = [(t, train) for t, train in plan.template.segments(rec) if t]
            if not any(not t.isspace() for t, _ in segments):
                skipped.append(start + k)  # nothing to learn from (e.g. empty source files)
                continue
            docs.append((start + k, segments))
            kept += 1
            if plan.config.max_docs is not None and kept >= plan.config.max_docs:
                yield docs, skipped
                return
        yield docs, skipped


def _documents(plan: _Plan) -> Iterator[tuple[int, list[tuple[str, bool]]]]:
    """(record index, segments) of every kept document, in order (the tokenizer's sample)."""
    for docs, _ in _rendered(plan, 1000):
        yield from docs


def validation_split(fraction: float, seed: int) -> Callable[[int], bool]:
    """Record i goes to validation iff floor((i+1+o)f) > floor((i+o)f): exactly round(n f) of
    any n consecutive records, evenly spaced, decided record by record (streaming-friendly).
    Exact rational arithmetic, so 0.3 means 30%; the offset o comes from the seed."""
    f = Fraction(fraction).limit_denominator(1_000_000)
    offset = seed % f.denominator if f.denominator > 1 else 0

    def in_val(i: int) -> bool:
        j = i + offset
        return (j + 1) * f.numerator // f.denominator > j * f.numerator // f.denominator

    return in_val


def _tokenizer_spec_hash(config: PrepareConfig, plans: list[_Plan]) -> str:
    spec: dict[str, Any] = {"tokenizer": asdict(config.tokenizer), "seed": config.seed}
    if config.tokenizer.path is not None and Path(config.tokenizer.path).is_file():
        spec["file"] = hashlib.sha256(Path(config.tokenizer.path).read_bytes()).hexdigest()
    if config.tokenizer.train is not None:  # a trained tokenizer depends on its sample
        spec["sample"] = [
            (
                p.name,
                source_fingerprint(p.source),
                asdict(p.template),
                p.config.val_fraction,
                p.config.max_docs,
            )
            for p in plans
        ]
    return hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _get_tokenizer(
    config: PrepareConfig, plans: list[_Plan], root: Path, sharded: bool = False
) -> tuple[Tokenizer, str]:
    spec_hash = _tokenizer_spec_hash(config, plans)
    old_index = root / "store.json"
    if old_index.is_file() and (root / "tokenizer.json").is_file():
        index = json.loads(old_index.read_text())
        if index.get("tokenizer_spec") == spec_hash:
            return Tokenizer.from_file(str(root / "tokenizer.json")), spec_hash
    shared = root / SHARDS / "tokenizer.json"  # trained once for the shards (--tokenizer_only)
    if shared.is_file() and (root / SHARDS / "tokenizer.spec").read_text() == spec_hash:
        return Tokenizer.from_file(str(shared)), spec_hash
    tk = config.tokenizer
    if tk.train is None:
        return load_tokenizer(tk.path, tk.hub), spec_hash
    if sharded:  # N nodes must not train N (possibly different) tokenizers
        raise MidtrainError(
            "tokenizer.train: shards share one trained tokenizer; train it once first with "
            "`midtrain prepare --config <yaml> --tokenizer_only` (same config)"
        )

    def sample() -> Iterator[str]:
        # training documents only: validation text must not shape the tokenizer
        for p in plans:
            in_val = validation_split(p.config.val_fraction, config.seed)
            train_docs = ((i, segs) for i, segs in _documents(p) if not in_val(i))
            for _, segments in islice(train_docs, tk.train.sample_docs):
                yield "".join(t for t, _ in segments)

    print(f"training a byte-level BPE tokenizer (vocab {tk.train.vocab_size}) on a sample...")
    return train_bpe(sample(), tk.train.vocab_size, tk.eos, tk.train.min_frequency), spec_hash


def _encoder(tok: Tokenizer) -> Callable[[list[str]], list[list[int]]]:
    # A literal EOS string inside a document is text, not the end of the document.
    tok.encode_special_tokens = True
    encode = getattr(tok, "encode_batch_fast", tok.encode_batch)  # skips offsets if it can

    def run(texts: list[str]) -> list[list[int]]:
        return [e.ids for e in encode(texts, add_special_tokens=False)]

    return run


def _encode_shard(
    plan: _Plan,
    tokenizer_json: str,
    eos: int,
    seed: int,
    batch_size: int,
    out: Path,
    index: int = 0,
    count: int = 1,
    progress: bool = False,
) -> dict[str, Any]:
    """Encode shard ``index`` of ``count`` of a domain into ``out``: the store files of each
    split (plus ``.records``, and ``skipped.records``, when ``count`` > 1). With count 1 this
    is the whole domain. Caps apply to the shard's own documents: a superset of what the
    merged domain keeps from it."""
    d = plan.config
    tok = Tokenizer.from_str(tokenizer_json)
    encode = _encoder(tok)
    dtype = token_dtype(tok.get_vocab_size())
    with_mask = plan.template.has_context and d.mask_prompt
    out.mkdir(parents=True)
    writers = {s: SplitWriter(out, s, dtype, with_mask, with_records=count > 1) for s in SPLITS}
    in_val = validation_split(d.val_fraction, seed)
    total_tokens, last_kept = 0, -1
    skipped: list[int] = []
    bar = tqdm(
        desc=f"prepare {plan.name}",
        unit=" docs",
        leave=False,
        mininterval=1.0,
        disable=not progress,
    )
    try:
        for docs, batch_skipped in _rendered(plan, batch_size, index, count):
            skipped += batch_skipped
            flat = encode([t for _, segs in docs for t, _ in segs])
            groups: dict[str, dict[str, list]] = {
                s: {"ids": [], "lengths": [], "bytes": [], "records": [], "flags": [], "runs": []}
                for s in SPLITS
            }
            k, done = 0, False
            for i, segments in docs:
                pieces = flat[k : k + len(segments)]
                k += len(segments)
                g = groups["val" if in_val(i) else "train"]
                n = 1
                for piece in pieces:
                    g["ids"] += piece
                    n += len(piece)
                g["ids"].append(eos)
                g["lengths"].append(n)
                g["bytes"].append(sum(len(t.encode("utf-8")) for t, _ in segments))
                g["records"].append(i)
                if with_mask:
                    g["flags"] += [int(train) for _, train in segments] + [1]
                    g["runs"] += [len(piece) for piece in pieces] + [1]
                total_tokens += n
                last_kept = i
                if d.max_tokens is not None and total_tokens >= d.max_tokens:
                    done = True
                    break
            for s, g in groups.items():
                mask = (
                    np.repeat(np.array(g["flags"], dtype=np.uint8), g["runs"])
                    if with_mask
                    else None
                )
                writers[s].add_batch(
                    np.array(g["ids"], dtype=dtype),
                    np.array(g["lengths"], dtype=np.int64),
                    g["bytes"],
                    mask,
                    g["records"],
                )
            bar.update(len(docs))
            if done:
                break
    finally:
        bar.close()
        for w in writers.values():
            w.close()
    if (d.max_tokens is not None and total_tokens >= d.max_tokens) or (
        d.max_docs is not None and sum(w.num_docs for w in writers.values()) >= d.max_docs
    ):
        skipped = [i for i in skipped if i < last_kept]  # records past the cap were not needed
    if count > 1:
        np.array(skipped, dtype=np.int64).tofile(out / "skipped.records")
    return {
        "splits": {
            s: {"docs": w.num_docs, "tokens": w.num_tokens, "bytes": w.num_bytes}
            for s, w in writers.items()
        },
        "skipped": len(skipped),
        "with_mask": with_mask,
        "dtype": dtype.name,
    }


def _array(path: Path, dtype: Any) -> np.ndarray:
    return np.memmap(path, dtype=dtype, mode="r") if path.stat().st_size else np.zeros(0, dtype)


def _copy(src: Path, dst: Any, start: int, stop: int) -> None:
    """Bytes [start, stop) of src appended to the open file dst, in bounded chunks."""
    with src.open("rb") as f:
        f.seek(start)
        left = stop - start
        while left > 0:
            chunk = f.read(min(left, 1 << 24))
            dst.write(chunk)
            left -= len(chunk)


def _merge_shards(
    plan: _Plan, shards: list[Path], out: Path, batch_size: int, dtype: np.dtype, with_mask: bool
) -> dict[str, Any]:
    """Interleave shard outputs batch by batch in source record order, applying the domain's
    caps exactly as one process would: the result is byte-identical to a 1-process build."""
    d = plan.config
    n = len(shards)
    size = dtype.itemsize
    recs = [{s: _array(p / f"{s}.records", np.int64) for s in SPLITS} for p in shards]
    offs = [{s: np.fromfile(p / f"{s}.docs", dtype=np.int64) for s in SPLITS} for p in shards]
    nbytes = [{s: _array(p / f"{s}.bytes", np.int64) for s in SPLITS} for p in shards]
    cursor = [dict.fromkeys(SPLITS, 0) for _ in shards]
    out.mkdir(parents=True)
    files = {
        (s, ext): (out / f"{s}.{ext}").open("wb")
        for s in SPLITS
        for ext in ("tokens", "docs", "bytes", *(("mask",) if with_mask else ()))
    }
    counts = {s: {"docs": 0, "tokens": 0, "bytes": 0} for s in SPLITS}
    for s in SPLITS:
        np.zeros(1, dtype=np.int64).tofile(files[s, "docs"])
    kept, total_tokens, last_kept, capped = 0, 0, -1, False
    try:
        b = 0
        while not capped and any(cursor[w][s] < len(recs[w][s]) for w in range(n) for s in SPLITS):
            w = b % n
            hi = (b + 1) * batch_size
            take = {}
            for s in SPLITS:
                c = cursor[w][s]
                take[s] = (c, c + int(np.searchsorted(recs[w][s][c:], hi)))
            if d.max_docs is not None or d.max_tokens is not None:
                order_recs = np.concatenate([recs[w][s][c:e] for s, (c, e) in take.items()])
                lengths = np.concatenate(
                    [np.diff(offs[w][s][c : e + 1]) for s, (c, e) in take.items()]
                )
                split_of = np.concatenate(
                    [np.full(e - c, k) for k, (c, e) in enumerate(take.values())]
                )
                order = np.argsort(order_recs, kind="stable")
                keep = len(order)
                if d.max_docs is not None and kept + keep >= d.max_docs:
                    keep, capped = d.max_docs - kept, True
                if d.max_tokens is not None:
                    cum = total_tokens + np.cumsum(lengths[order])
                    cross = int(np.searchsorted(cum, d.max_tokens))  # first cum >= cap
                    if cross < keep:
                        keep, capped = cross + 1, True
                if keep:
                    last_kept = int(order_recs[order[keep - 1]])
                kept += keep
                total_tokens += int(lengths[order[:keep]].sum())
                for k, (s, (c, _)) in enumerate(take.items()):
                    take[s] = (c, c + int((split_of[order[:keep]] == k).sum()))
            for s, (c, e) in take.items():
                if e == c:
                    continue
                lo, hi_tok = int(offs[w][s][c]), int(offs[w][s][e])
                src = shards[w]
                _copy(src / f"{s}.tokens", files[s, "tokens"], lo * size, hi_tok * size)
                if with_mask:
                    _copy(src / f"{s}.mask", files[s, "mask"], lo, hi_tok)
                (counts[s]["tokens"] + offs[w][s][c + 1 : e + 1] - lo).tofile(files[s, "docs"])
                doc_bytes = np.asarray(nbytes[w][s][c:e])
                doc_bytes.tofile(files[s, "bytes"])
                counts[s]["docs"] += e - c
                counts[s]["tokens"] += hi_tok - lo
                counts[s]["bytes"] += int(doc_bytes.sum())
                cursor[w][s] = e
            b += 1
    finally:
        for f in files.values():
            f.close()
    skipped = np.concatenate([np.fromfile(p / "skipped.records", dtype=np.int64) for p in shards])
    n_skipped = int((skipped < last_kept).sum()) if capped else len(skipped)
    return {"splits": counts, "skipped": n_skipped, "with_mask": with_mask, "dtype": dtype.name}


def _write_manifest(
    plan: _Plan, out: Path, built: dict[str, Any], eos: int, tok_hash: str
) -> dict[str, Any]:
    files = {
        f.name: {"bytes": f.stat().st_size, "sha256": file_digest(f)} for f in sorted(out.iterdir())
    }
    if sum(s["docs"] for s in built["splits"].values()) == 0:
        raise MidtrainError(
            f"{plan.where}: empty domain: the source gave no documents"
            + (
                f" ({built['skipped']:,} empty or whitespace-only records)"
                if built["skipped"]
                else ""
            )
        )
    manifest = {
        "name": plan.name,
        "format_version": FORMAT_VERSION,
        "fingerprint": plan.fingerprint,
        "content_hash": content_hash(files),
        "source": plan.source,
        "source_fingerprint": source_fingerprint(plan.source),
        "template": asdict(plan.template),
        "mask_prompt": built["with_mask"],
        "val_fraction": plan.config.val_fraction,
        "dtype": built["dtype"],
        "eos_id": eos,
        "tokenizer_hash": tok_hash,
        "splits": built["splits"],
        "skipped_empty": built["skipped"],
        "files": files,
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2, default=str))
    return manifest


def _worker_init() -> None:
    # one process per core already: the tokenizer's own thread pool would oversubscribe
    os.environ["TOKENIZERS_PARALLELISM"] = "false"


def _encode_job(args: tuple) -> dict[str, Any]:
    return _encode_shard(*args)


class _Builder:
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
            self.pool = ProcessPoolExecutor(processes, mp_context=context, initializer=_worker_init)

    def shard(self, plan: _Plan, out: Path, index: int, count: int) -> dict[str, Any]:
        c = self.config
        return _encode_shard(
            plan, self.tokenizer_json, self.eos, c.seed, c.batch_size, out, index, count
        )

    def build(self, plan: _Plan, out: Path) -> dict[str, Any]:
        c = self.config
        if self.pool is None:
            return _encode_shard(
                plan, self.tokenizer_json, self.eos, c.seed, c.batch_size, out, progress=True
            )
        n = self.processes
        parts = out.parent / f"{out.name}.parts"
        jobs = [
            (plan, self.tokenizer_json, self.eos, c.seed, c.batch_size, parts / str(i), i, n)
            for i in range(n)
        ]
        results = list(self.pool.map(_encode_job, jobs))
        merged = _merge_shards(
            plan,
            [parts / str(i) for i in range(n)],
            out,
            c.batch_size,
            self.dtype,
            results[0]["with_mask"],
        )
        shutil.rmtree(parts)
        return merged

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(cancel_futures=True)


def _domain_fingerprint(plan: _Plan, tok_hash: str, config: PrepareConfig) -> str:
    spec = {
        "format": FORMAT_VERSION,
        "source": source_fingerprint(plan.source),
        "config": asdict(plan.config),
        "tokenizer": tok_hash,
        "eos": config.tokenizer.eos,
        "seed": config.seed,
    }
    return hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _check_output(root: Path) -> None:
    if root.exists() and not root.is_dir():
        raise MidtrainError(f"output: {root} exists and is not a directory")
    if (
        root.is_dir()
        and any(p.name != SHARDS for p in root.iterdir())
        and not (root / "store.json").is_file()
    ):
        raise MidtrainError(
            f"output: {root} is a non-empty directory that is not a token store; "
            "choose another output"
        )
    probe = root
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not os.access(probe, os.W_OK | os.X_OK):  # also false on a read-only filesystem
        raise MidtrainError(
            f"output: {probe} is not writable; choose another output or fix its permissions"
        )


def _reusable(plan: _Plan, path: Path) -> dict[str, Any] | None:
    manifest_path = path / "manifest.json"
    if not manifest_path.is_file():
        return None
    manifest = json.loads(manifest_path.read_text())
    if manifest.get("fingerprint") != plan.fingerprint:
        return None
    try:
        check_sizes(path, manifest)
    except MidtrainError as e:
        print(f"[{plan.name}] damaged ({e}): rebuilding")
        return None
    return manifest


def _shard_dirs(root: Path, plan: _Plan, batch_size: int) -> list[Path]:
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


def _run_shard(
    config: PrepareConfig,
    plans: list[_Plan],
    root: Path,
    builder: _Builder,
    reused: dict[str, Any],
    index: int,
    count: int,
) -> Path:
    for p in plans:
        if p.name in reused:
            print(f"[{p.name}] unchanged in the store: nothing to do")
            continue
        folder = root / SHARDS / p.name
        target = folder / f"{index}-of-{count}"
        meta = target / "shard.json"
        if meta.is_file() and json.loads(meta.read_text())["fingerprint"] == p.fingerprint:
            print(f"[{p.name}] shard {index}/{count} done already")
            continue
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / f".tmp-{index}-of-{count}-{os.getpid()}"
        try:
            t0 = time.perf_counter()
            result = builder.shard(p, tmp, index, count)
            (tmp / "shard.json").write_text(
                json.dumps(
                    {
                        "fingerprint": p.fingerprint,
                        "index": index,
                        "count": count,
                        "batch_size": config.batch_size,
                        **result,
                    },
                    indent=2,
                )
            )
            if target.exists():
                shutil.rmtree(target)
            os.replace(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        n = sum(s["tokens"] for s in result["splits"].values())
        print(
            f"[{p.name}] shard {index}/{count}: {n:,} tokens in "
            f"{time.perf_counter() - t0:.1f}s; then `midtrain prepare --config <yaml> --merge`"
        )
    return root


def prepare(
    config: PrepareConfig,
    shard: tuple[int, int] | None = None,
    merge: bool = False,
    tokenizer_only: bool = False,
) -> Path:
    """Build (or reuse) the store described by ``config``; returns its root.

    shard: (i, N): encode only shard i of N of every domain that needs building, into
      ``<output>/.shards/`` (one node of a multi-node prepare). merge: build the store from the
      complete shard set. tokenizer_only: load or train the tokenizer once, for the shards.
    """
    plans = _check(config)
    root = Path(config.output)
    if shard is not None and not 0 <= shard[0] < shard[1]:
        raise MidtrainError(f"--shard: i/N needs 0 <= i < N, got {shard[0]}/{shard[1]}")
    _check_output(root)
    for p in plans:  # fail on a bad source or template before spending time on a tokenizer
        next(_rendered(p, 1), None)

    sharded = shard is not None or merge
    tok, tok_spec = _get_tokenizer(config, plans, root, sharded and not tokenizer_only)
    eos = eos_id(tok, config.tokenizer.eos)
    tok_hash = tokenizer_hash(tok)
    for p in plans:
        p.fingerprint = _domain_fingerprint(p, tok_hash, config)
    reused = {p.name: m for p in plans if (m := _reusable(p, root / p.name)) is not None}
    if tokenizer_only:
        (root / SHARDS).mkdir(parents=True, exist_ok=True)
        tmp = root / SHARDS / f".tokenizer-{os.getpid()}.json"
        tok.save(str(tmp))
        (root / SHARDS / "tokenizer.spec").write_text(tok_spec)
        os.replace(tmp, root / SHARDS / "tokenizer.json")
        print(f"tokenizer for the shards: {root / SHARDS / 'tokenizer.json'}")
        return root
    shard_dirs = {
        p.name: _shard_dirs(root, p, config.batch_size)
        for p in plans
        if merge and p.name not in reused
    }
    created = not root.exists()
    root.mkdir(parents=True, exist_ok=True)
    # a node's shard is one process; a merge only copies
    builder = _Builder(config, tok, eos, 1 if shard is not None or merge else config.num_proc)
    if shard is not None:
        if config.num_proc > 1:
            print(
                f"num_proc {config.num_proc} ignored with --shard: a shard is one process "
                "(give N = nodes x cores shards instead)"
            )
        try:
            return _run_shard(config, plans, root, builder, reused, *shard)
        finally:
            builder.close()
    staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=root))
    built: dict[str, dict[str, Any]] = {}
    ok = False
    try:
        for p in plans:
            if p.name in reused:
                continue
            old = root / p.name / "manifest.json"
            why = "new" if not old.is_file() else "source, config or tokenizer changed"
            print(f"[{p.name}] building ({why})")
            t0 = time.perf_counter()
            if merge:
                first = json.loads((shard_dirs[p.name][0] / "shard.json").read_text())
                result = _merge_shards(
                    p,
                    shard_dirs[p.name],
                    staging / p.name,
                    config.batch_size,
                    np.dtype(first["dtype"]),
                    first["with_mask"],
                )
            else:
                result = builder.build(p, staging / p.name)
            built[p.name] = _write_manifest(p, staging / p.name, result, eos, tok_hash)
            n = sum(s["tokens"] for s in built[p.name]["splits"].values())
            dt = time.perf_counter() - t0
            print(f"[{p.name}] {n:,} tokens in {dt:.1f}s ({n / max(dt, 1e-9):,.0f} tokens/s)")
        # Every domain succeeded: swap the new ones in, then the index.
        # A reused store is left byte-for-byte alone: write only what changed.
        old_tok = root / "tokenizer.json"
        if not old_tok.is_file() or tokenizer_hash(Tokenizer.from_file(str(old_tok))) != tok_hash:
            tok.save(str(staging / "tokenizer.json"))
            os.replace(staging / "tokenizer.json", old_tok)
        for name in built:
            target = root / name
            if target.exists():
                shutil.rmtree(target)
            os.replace(staging / name, target)
        old_index = root / "store.json"
        old_domains = json.loads(old_index.read_text())["domains"] if old_index.is_file() else []
        for name in set(old_domains) - set(config.domains):  # dropped from the config
            shutil.rmtree(root / name, ignore_errors=True)
        index = {
            "format_version": FORMAT_VERSION,
            "domains": [p.name for p in plans],
            "vocab_size": tok.get_vocab_size(),
            "eos_id": eos,
            "eos": config.tokenizer.eos,
            "tokenizer_hash": tok_hash,
            "tokenizer_spec": tok_spec,
        }
        text = json.dumps(index, indent=2)
        if not (root / "store.json").is_file() or (root / "store.json").read_text() != text:
            tmp = root / "store.json.tmp"
            tmp.write_text(text)
            os.replace(tmp, root / "store.json")
        if merge:
            shutil.rmtree(root / SHARDS, ignore_errors=True)
        ok = True
    finally:
        builder.close()
        shutil.rmtree(staging, ignore_errors=True)
        if created and not ok:  # a failed first build leaves no half-made output behind
            shutil.rmtree(root, ignore_errors=True)
    _print_summary(root, plans, built, reused)
    return root


def verify_store(root: str | os.PathLike) -> None:
    """``midtrain prepare --verify <store>``: rehash every domain's files against its manifest;
    one line per domain, and an error naming the first damaged file."""
    from midtrain.data.store import verify

    report = verify(root)
    for name, problem in report:
        print(f"  {name:<16} {problem}")
    bad = [(name, problem) for name, problem in report if problem != "ok"]
    if bad:
        raise MidtrainError(f"{len(bad)} of {len(report)} domain(s) damaged; first: {bad[0][1]}")
    print(f"store {root}: {len(report)} domain(s) verified")


def _print_summary(root: Path, plans: list[_Plan], built: dict, reused: dict) -> None:
    print(f"store {root}:")
    print(
        f"  {'domain':<16} {'state':<7} {'train docs':>10} {'train tokens':>13} "
        f"{'val docs':>8} {'val tokens':>11} {'skipped empty':>13}"
    )
    for p in plans:
        m = built.get(p.name) or reused[p.name]
        tr, va = m["splits"]["train"], m["splits"]["val"]
        state = "built" if p.name in built else "reused"
        print(
            f"  {p.name:<16} {state:<7} {tr['docs']:>10,} {tr['tokens']:>13,} "
            f"{va['docs']:>8,} {va['tokens']:>11,} {m.get('skipped_empty', 0):>13,}"
        )
