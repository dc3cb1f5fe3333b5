"""``prepare()``: the steps of a run in order: check everything, get the tokenizer, decide what
to rebuild, build it in a staging folder (or one shard of it), then swap it in."""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer

from midtrain.data.hub import TOKENIZER_FILE
from midtrain.data.prepare.config import PrepareConfig
from midtrain.data.prepare.console import DomainProgress, print_summary, summary, write_summary
from midtrain.data.prepare.encode import Builder
from midtrain.data.prepare.manifest import write_manifest
from midtrain.data.prepare.plan import (
    SHARDS,
    Plan,
    check_output,
    domain_fingerprint,
    make_plans,
    reusable,
)
from midtrain.data.prepare.pretokenized import build_pretokenized
from midtrain.data.prepare.render import rendered
from midtrain.data.prepare.shards import merge_domain, shard_dirs, shard_done, write_shard
from midtrain.data.prepare.tokenizer import (
    bind_chat_templates,
    document_bos,
    document_prefix,
    get_tokenizer,
    model_conventions,
    save_for_shards,
    with_model_eos,
)
from midtrain.data.store import StoreIndex
from midtrain.data.tokenizer import Bos, eos_id, tokenizer_hash
from midtrain.errors import MidtrainError


@dataclass
class _Run:
    """What every step of one prepare run shares, once the tokenizer is known."""

    config: PrepareConfig
    plans: list[Plan]
    root: Path
    tok: Tokenizer
    tok_spec: str
    eos: int
    bos: Bos
    tok_hash: str
    reused: dict[str, dict[str, Any]]
    started: float


def _start(config: PrepareConfig, shard: tuple[int, int] | None, sharded: bool) -> _Run:
    """Check everything that can be checked, get the tokenizer, and find what is reusable."""
    started = time.perf_counter()
    plans = make_plans(config)
    root = Path(config.output)
    if shard is not None and not 0 <= shard[0] < shard[1]:
        raise MidtrainError(f"--shard: i/N needs 0 <= i < N, got {shard[0]}/{shard[1]}")
    check_output(root)
    tokens = model_conventions(config)  # a released model's EOS, BOS and chat template
    config = with_model_eos(config, tokens)
    bind_chat_templates(plans, tokens, config.tokenizer.eos or "")
    for p in plans:  # fail on a bad source or template before spending time on a tokenizer
        if not p.config.pretokenized:
            next(rendered(p, 1), None)
    tok, tok_spec = get_tokenizer(config, plans, root, sharded)
    eos = eos_id(tok, config.tokenizer.eos or "")
    tok_hash = tokenizer_hash(tok)
    prefix = document_prefix(tok, tokens)
    for p in plans:
        p.prefix = prefix
        p.fingerprint = domain_fingerprint(p, tok_hash, config)
    reused = {p.name: m for p in plans if (m := reusable(p, root / p.name)) is not None}
    bos = document_bos(tok, tokens, prefix)
    return _Run(config, plans, root, tok, tok_spec, eos, bos, tok_hash, reused, started)


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
    sharded = shard is not None or merge
    run = _start(config, shard, sharded and not tokenizer_only)
    if tokenizer_only:
        print(f"tokenizer for the shards: {save_for_shards(run.root, run.tok, run.tok_spec)}")
        return run.root
    shard_sets = {
        p.name: shard_dirs(run.root, p, config.batch_size)
        for p in run.plans
        if merge and p.name not in run.reused and not p.config.pretokenized
    }
    created = not run.root.exists()
    run.root.mkdir(parents=True, exist_ok=True)
    # a node's shard is one process; a merge only copies
    builder = Builder(config, run.tok, run.eos, 1 if sharded else config.num_proc)
    try:
        if shard is not None:
            if config.num_proc > 1:
                print(
                    f"num_proc {config.num_proc} ignored with --shard: a shard is one process "
                    "(give N = nodes x cores shards instead)"
                )
            _run_shard(run, builder, *shard)
            return run.root
        _build_store(run, builder, shard_sets, created)
    finally:
        builder.close()
    return run.root


def _run_shard(run: _Run, builder: Builder, index: int, count: int) -> None:
    """``--shard i/N``: this node's shard of every domain that needs building."""
    for p in run.plans:
        if p.name in run.reused:
            print(f"[{p.name}] unchanged in the store: nothing to do")
            continue
        if p.config.pretokenized:
            print(f"[{p.name}] pretokenized: nothing to tokenize; indexed by --merge")
            continue
        if shard_done(run.root, p, index, count):
            print(f"[{p.name}] shard {index}/{count} done already")
            continue
        t0 = time.perf_counter()
        bar = DomainProgress(p, f" (shard {index}/{count})")
        done: dict[str, Any] | None = None
        try:
            result = done = write_shard(
                run.root,
                p,
                index,
                count,
                run.config.batch_size,
                partial(builder.shard, p, index=index, count=count, progress=bar),
            )
        finally:
            bar.finish(done)
        n = sum(s["tokens"] for s in result["splits"].values())
        print(
            f"[{p.name}] shard {index}/{count}: {n:,} tokens in "
            f"{time.perf_counter() - t0:.1f}s; then `midtrain prepare --config <yaml> --merge`"
        )


def _build_domain(
    run: _Run, builder: Builder, p: Plan, out: Path, shards: list[Path] | None
) -> dict[str, Any]:
    """One domain built into ``out`` (from its shards with ``--merge``); its manifest."""
    old = run.root / p.name / "manifest.json"
    why = "new" if not old.is_file() else "source, config or tokenizer changed"
    print(f"[{p.name}] building ({why})")
    t0 = time.perf_counter()
    if p.config.pretokenized:  # no token is copied: the store indexes the files
        result = build_pretokenized(p, out, run.tok, run.eos, run.config.seed)
    elif shards is not None:
        result = merge_domain(p, shards, out, run.config.batch_size)
    else:
        bar, done = DomainProgress(p), None
        try:
            result = done = builder.build(p, out, bar)
        finally:
            bar.finish(done)
    manifest = write_manifest(p, out, result, run.eos, run.tok_hash)
    n = sum(s["tokens"] for s in manifest["splits"].values())
    dt = time.perf_counter() - t0
    print(f"[{p.name}] {n:,} tokens in {dt:.1f}s ({n / max(dt, 1e-9):,.0f} tokens/s)")
    return manifest


def _build_store(
    run: _Run, builder: Builder, shard_sets: dict[str, list[Path]], created: bool
) -> None:
    """Every domain that needs it built in a staging folder, then swapped in; a failure
    leaves the store as it was (and a first build leaves nothing)."""
    staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=run.root))
    built: dict[str, dict[str, Any]] = {}
    seconds: dict[str, float] = {}
    ok = False
    try:
        for p in run.plans:
            if p.name not in run.reused:
                t0 = time.perf_counter()
                built[p.name] = _build_domain(
                    run, builder, p, staging / p.name, shard_sets.get(p.name)
                )
                seconds[p.name] = time.perf_counter() - t0
        changed = _swap_in(run, staging, built)
        if shard_sets:
            shutil.rmtree(run.root / SHARDS, ignore_errors=True)
        ok = True
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        if created and not ok:  # a failed first build leaves no half-made output behind
            shutil.rmtree(run.root, ignore_errors=True)
    report = summary(
        run.root, run.plans, built, run.reused, seconds, time.perf_counter() - run.started
    )
    # a run that changed nothing leaves the store, its last summary included, byte for byte
    print_summary(report, write_summary(run.root, report) if changed else None)


def _swap_in(run: _Run, staging: Path, built: dict[str, dict[str, Any]]) -> bool:
    """Every domain succeeded: the new ones, the tokenizer if it changed, the index last.
    A reused store is left byte-for-byte alone: only what changed is written. Whether
    anything changed."""
    root = run.root
    old_tok = root / TOKENIZER_FILE
    if not old_tok.is_file() or tokenizer_hash(Tokenizer.from_file(str(old_tok))) != run.tok_hash:
        run.tok.save(str(staging / TOKENIZER_FILE))
        os.replace(staging / TOKENIZER_FILE, old_tok)
    for name in built:
        target = root / name
        if target.exists():
            shutil.rmtree(target)
        os.replace(staging / name, target)
    old = StoreIndex.find(root)
    dropped = set(old.domains if old is not None else []) - set(run.config.domains)
    for name in dropped:  # dropped from the config
        shutil.rmtree(root / name, ignore_errors=True)
    index = StoreIndex(
        domains=[p.name for p in run.plans],
        vocab_size=run.tok.get_vocab_size(),
        eos_id=run.eos,
        tokenizer_hash=run.tok_hash,
        eos=run.config.tokenizer.eos,
        tokenizer_spec=run.tok_spec,
        bos_id=run.bos.id,
        add_bos=run.bos.added,
    )
    index.write(root)
    return bool(built or dropped) or old != index
