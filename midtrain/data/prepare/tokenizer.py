"""The store's tokenizer: reused from the store or the shards' shared copy while its spec is
unchanged, else loaded (``path``/``hub``) or trained on the domains' training documents."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterator
from dataclasses import asdict
from itertools import islice
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer

from midtrain.data.prepare.config import PrepareConfig
from midtrain.data.prepare.plan import SHARDS, Plan
from midtrain.data.prepare.render import documents, validation_split
from midtrain.data.sources import source_fingerprint
from midtrain.data.store import StoreIndex
from midtrain.data.tokenizer import load_tokenizer, train_bpe
from midtrain.errors import MidtrainError


def tokenizer_spec_hash(config: PrepareConfig, plans: list[Plan]) -> str:
    """What the tokenizer depends on (for a trained one: its sample's sources too)."""
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


def _stored(root: Path, spec_hash: str) -> Tokenizer | None:
    """The store's own tokenizer, or the one shared with the shards, when made from this spec."""
    index = StoreIndex.find(root)
    own = root / "tokenizer.json"
    if index is not None and own.is_file() and index.tokenizer_spec == spec_hash:
        return Tokenizer.from_file(str(root / "tokenizer.json"))
    shared = root / SHARDS / "tokenizer.json"  # trained once for the shards (--tokenizer_only)
    if shared.is_file() and (root / SHARDS / "tokenizer.spec").read_text() == spec_hash:
        return Tokenizer.from_file(str(shared))
    return None


def get_tokenizer(
    config: PrepareConfig, plans: list[Plan], root: Path, sharded: bool = False
) -> tuple[Tokenizer, str]:
    """(tokenizer, spec hash): reused, loaded or trained (never by a shard: see below)."""
    spec_hash = tokenizer_spec_hash(config, plans)
    found = _stored(root, spec_hash)
    if found is not None:
        return found, spec_hash
    tk = config.tokenizer
    train = tk.train
    if train is None:
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
            train_docs = ((i, segs) for i, segs in documents(p) if not in_val(i))
            for _, segments in islice(train_docs, train.sample_docs):
                yield "".join(t for t, _ in segments)

    print(f"training a byte-level BPE tokenizer (vocab {train.vocab_size}) on a sample...")
    return train_bpe(sample(), train.vocab_size, tk.eos, train.min_frequency), spec_hash


def save_for_shards(root: Path, tok: Tokenizer, spec_hash: str) -> Path:
    """``--tokenizer_only``: the tokenizer every ``--shard`` run of this config loads."""
    (root / SHARDS).mkdir(parents=True, exist_ok=True)
    tmp = root / SHARDS / f".tokenizer-{os.getpid()}.json"
    tok.save(str(tmp))
    (root / SHARDS / "tokenizer.spec").write_text(spec_hash)
    os.replace(tmp, root / SHARDS / "tokenizer.json")
    return root / SHARDS / "tokenizer.json"


def encoder(tok: Tokenizer) -> Callable[[list[str]], list[list[int]]]:
    """Token ids of each text, no special tokens added."""
    # A literal EOS string inside a document is text, not the end of the document.
    tok.encode_special_tokens = True
    encode = getattr(tok, "encode_batch_fast", tok.encode_batch)  # skips offsets if it can

    def run(texts: list[str]) -> list[list[int]]:
        return [e.ids for e in encode(texts, add_special_tokens=False)]

    return run
