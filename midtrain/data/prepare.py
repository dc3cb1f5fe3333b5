"""``midtrain prepare``: render, tokenize and store every domain of a prepare config.

Everything that can be wrong with the input is checked before anything is written; a rebuild
happens in temporary directories swapped in only when every domain has succeeded, so a failed
run leaves an existing store exactly as it was.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import re
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from fractions import Fraction
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import Tokenizer
from tqdm import tqdm

from midtrain.data.sources import Template, iter_records, resolve_source, source_fingerprint
from midtrain.data.store import FORMAT_VERSION, SplitWriter, token_dtype
from midtrain.data.tokenizer import (
    DEFAULT_EOS,
    eos_id,
    load_tokenizer,
    tokenizer_hash,
    train_bpe,
)
from midtrain.errors import MidtrainError

_DOMAIN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


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


@dataclass
class DomainConfig:
    """One named domain.

    source: ``datasets.load_dataset`` keyword arguments (``path`` may be a local .jsonl/.json/
      .parquet/.csv/.txt file), or ``{builtin: python-docs|python-stdlib|arithmetic, ...}``.
    text: template for plain documents; or ``prompt`` + ``response`` for instruction data; or
      ``chat``: a field with a list of turns, each rendered with ``chat_turn``.
    train_roles: with ``chat``, the roles whose turns are trained on.
    mask_prompt: give context tokens (the prompt; chat turns of other roles) loss-mask 0.
    val_fraction: this share of documents, evenly spaced, goes to validation (1.0 = eval-only).
    max_docs / max_tokens: stop after this many documents / tokens (useful with streaming).
    """

    source: dict[str, Any]
    text: str | None = "{text}"
    prompt: str | None = None
    response: str | None = None
    chat: str | None = None
    chat_turn: str = "{role}: {content}\n"
    train_roles: list[str] = field(default_factory=lambda: ["assistant"])
    mask_prompt: bool = True
    val_fraction: float = 0.05
    max_docs: int | None = None
    max_tokens: int | None = None

    def template(self) -> Template:
        if self.chat is not None:
            return Template(text=None, chat=self.chat, chat_turn=self.chat_turn,
                            train_roles=tuple(self.train_roles), prompt=self.prompt,
                            response=self.response)
        if self.prompt is not None or self.response is not None:
            return Template(text=None, prompt=self.prompt, response=self.response)
        return Template(text=self.text)


@dataclass
class PrepareConfig:
    output: str
    domains: dict[str, DomainConfig]
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    seed: int = 0
    batch_size: int = 1000


@dataclass
class _Plan:
    name: str
    config: DomainConfig
    source: dict[str, Any]
    template: Template
    fingerprint: str = ""


def _check(config: PrepareConfig) -> list[_Plan]:
    if not config.domains:
        raise MidtrainError("domains: the prepare config names no domains")
    tk = config.tokenizer
    if sum(x is not None for x in (tk.path, tk.hub, tk.train)) != 1:
        raise MidtrainError("tokenizer: give exactly one of `path`, `hub` or `train`")
    if tk.train is not None and tk.train.vocab_size < 257:
        raise MidtrainError("tokenizer.train.vocab_size: must be at least 257 (bytes + EOS)")
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


def _documents(plan: _Plan) -> Iterator[tuple[int, list[tuple[str, bool]]]]:
    """(record index, segments) for every non-empty rendered record, capped."""
    where = f"domains.{plan.name}"
    kept = 0
    try:
        records = iter_records(plan.source)
        for i, rec in enumerate(records):
            if i == 0:
                plan.template.check(rec, where)
            segments = [(t, train) for t, train in plan.template.segments(rec) if t]
            if not segments:
                continue  # e.g. empty source files: nothing to learn from
            yield i, segments
            kept += 1
            if plan.config.max_docs is not None and kept >= plan.config.max_docs:
                return
    except MidtrainError:
        raise
    except FileNotFoundError as e:
        raise MidtrainError(f"{where}.source: {e}") from None
    except Exception as e:  # datasets raises many types for a bad spec; keep it one line
        if os.environ.get("MIDTRAIN_TRACEBACK"):
            raise
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise MidtrainError(f"{where}.source: could not load records: {msg}") from None


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
        spec["sample"] = [(p.name, source_fingerprint(p.source), asdict(p.template),
                           p.config.val_fraction, p.config.max_docs) for p in plans]
    return hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _get_tokenizer(config: PrepareConfig, plans: list[_Plan], root: Path) -> tuple[Tokenizer, str]:
    spec_hash = _tokenizer_spec_hash(config, plans)
    old_index = root / "store.json"
    if old_index.is_file() and (root / "tokenizer.json").is_file():
        index = json.loads(old_index.read_text())
        if index.get("tokenizer_spec") == spec_hash:
            return Tokenizer.from_file(str(root / "tokenizer.json")), spec_hash
    tk = config.tokenizer
    if tk.train is None:
        return load_tokenizer(tk.path, tk.hub), spec_hash

    def sample() -> Iterator[str]:
        # training documents only: validation text must not shape the tokenizer
        for p in plans:
            in_val = validation_split(p.config.val_fraction, config.seed)
            train_docs = ((i, segs) for i, segs in _documents(p) if not in_val(i))
            for _, segments in islice(train_docs, tk.train.sample_docs):
                yield "".join(t for t, _ in segments)

    print(f"training a byte-level BPE tokenizer (vocab {tk.train.vocab_size}) on a sample...")
    return train_bpe(sample(), tk.train.vocab_size, tk.eos, tk.train.min_frequency), spec_hash


def _encode(tok: Tokenizer, texts: list[str]) -> list[list[int]]:
    encode = getattr(tok, "encode_batch_fast", tok.encode_batch)  # skips offsets when available
    return [e.ids for e in encode(texts, add_special_tokens=False)]


def _build_domain(plan: _Plan, tok: Tokenizer, eos: int, config: PrepareConfig,
                  out: Path) -> dict[str, Any]:
    d = plan.config
    dtype = token_dtype(tok.get_vocab_size())
    with_mask = plan.template.has_context and d.mask_prompt
    out.mkdir(parents=True)
    writers = {s: SplitWriter(out, s, dtype, with_mask) for s in ("train", "val")}
    in_val = validation_split(d.val_fraction, config.seed)
    total_tokens = 0
    bar = tqdm(desc=f"prepare {plan.name}", unit=" docs", leave=False, mininterval=1.0)
    docs = _documents(plan)
    try:
        while True:
            batch = list(islice(docs, config.batch_size))
            if not batch:
                break
            # every segment of the batch in one batch-encode call, then regrouped
            flat = _encode(tok, [t for _, segs in batch for t, _ in segs])
            grouped: dict[str, tuple[list, list, list]] = {"train": ([], [], []), "val": ([], [], [])}
            k = 0
            for i, segments in batch:
                pieces = flat[k : k + len(segments)]
                k += len(segments)
                ids = np.array(list(itertools.chain(*pieces, [eos])), dtype=np.int64)
                g = grouped["val" if in_val(i) else "train"]
                g[0].append(ids)
                g[1].append(sum(len(t.encode("utf-8")) for t, _ in segments))
                if with_mask:
                    g[2].append(np.repeat(
                        np.array([int(train) for _, train in segments] + [1], dtype=np.uint8),
                        [len(piece) for piece in pieces] + [1]))
                total_tokens += len(ids)
                if d.max_tokens is not None and total_tokens >= d.max_tokens:
                    break
            for s, (ids_list, nbytes, masks) in grouped.items():
                writers[s].add_batch(ids_list, nbytes, masks if with_mask else None)
            bar.update(len(batch))
            bar.set_postfix(tokens=total_tokens, refresh=False)
            if d.max_tokens is not None and total_tokens >= d.max_tokens:
                break
    finally:
        bar.close()
        for w in writers.values():
            w.close()
    if writers["train"].num_docs + writers["val"].num_docs == 0:
        raise MidtrainError(f"domains.{plan.name}: empty domain: the source gave no documents")
    content = hashlib.sha256()
    for s in ("train", "val"):
        content.update(writers[s].hash.digest())
    manifest = {
        "name": plan.name,
        "format_version": FORMAT_VERSION,
        "fingerprint": plan.fingerprint,
        "content_hash": content.hexdigest()[:16],
        "source": plan.source,
        "source_fingerprint": source_fingerprint(plan.source),
        "template": asdict(plan.template),
        "mask_prompt": with_mask,
        "val_fraction": d.val_fraction,
        "dtype": dtype.name,
        "eos_id": eos,
        "tokenizer_hash": tokenizer_hash(tok),
        "splits": {
            s: {"docs": w.num_docs, "tokens": w.num_tokens, "bytes": w.num_bytes}
            for s, w in writers.items()
        },
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2, default=str))
    return manifest


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


def prepare(config: PrepareConfig) -> Path:
    """Build (or reuse) the store described by ``config``; returns its root."""
    plans = _check(config)
    root = Path(config.output)
    if root.exists() and not root.is_dir():
        raise MidtrainError(f"output: {root} exists and is not a directory")
    if root.is_dir() and any(root.iterdir()) and not (root / "store.json").is_file():
        raise MidtrainError(
            f"output: {root} is a non-empty directory that is not a token store; "
            "choose another output"
        )
    for p in plans:  # fail on a bad template before spending time on a tokenizer
        next(_documents(p), None)

    tok, tok_spec = _get_tokenizer(config, plans, root)
    eos = eos_id(tok, config.tokenizer.eos)
    tok_hash = tokenizer_hash(tok)
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(f"{root}/.staging-{os.getpid()}")
    built: dict[str, dict[str, Any]] = {}
    reused: dict[str, dict[str, Any]] = {}
    try:
        for p in plans:
            p.fingerprint = _domain_fingerprint(p, tok_hash, config)
            old = root / p.name / "manifest.json"
            if old.is_file() and json.loads(old.read_text()).get("fingerprint") == p.fingerprint:
                reused[p.name] = json.loads(old.read_text())
                continue
            why = "new" if not old.is_file() else "source, config or tokenizer changed"
            print(f"[{p.name}] building ({why})")
            t0 = time.perf_counter()
            built[p.name] = _build_domain(p, tok, eos, config, staging / p.name)
            n = sum(s["tokens"] for s in built[p.name]["splits"].values())
            dt = time.perf_counter() - t0
            print(f"[{p.name}] {n:,} tokens in {dt:.1f}s ({n / max(dt, 1e-9):,.0f} tokens/s)")
        # Every domain succeeded: swap the new ones in, then the index.
        # A reused store is left byte-for-byte alone: write only what changed.
        old_tok = root / "tokenizer.json"
        if not old_tok.is_file() or tokenizer_hash(Tokenizer.from_file(str(old_tok))) != tok_hash:
            staging.mkdir(parents=True, exist_ok=True)
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
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    _print_summary(root, plans, built, reused)
    return root


def _print_summary(root: Path, plans: list[_Plan], built: dict, reused: dict) -> None:
    print(f"store {root}:")
    print(f"  {'domain':<16} {'state':<7} {'train docs':>10} {'train tokens':>13} "
          f"{'val docs':>8} {'val tokens':>11}")
    for p in plans:
        m = built.get(p.name) or reused[p.name]
        tr, va = m["splits"]["train"], m["splits"]["val"]
        state = "built" if p.name in built else "reused"
        print(f"  {p.name:<16} {state:<7} {tr['docs']:>10,} {tr['tokens']:>13,} "
              f"{va['docs']:>8,} {va['tokens']:>11,}")
