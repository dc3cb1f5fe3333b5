"""The store's tokenizer: reused from the store or the shards' shared copy while its spec is
unchanged, else loaded (``path``/``hub``) or trained on the domains' training documents."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterator
from dataclasses import asdict, replace
from itertools import accumulate, islice
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer

from midtrain.data.chat import ChatTemplate
from midtrain.data.hub import TOKENIZER_FILE
from midtrain.data.prepare.config import PrepareConfig
from midtrain.data.prepare.plan import SHARDS, Plan
from midtrain.data.prepare.render import documents, validation_split
from midtrain.data.sources import source_fingerprint
from midtrain.data.store import StoreIndex
from midtrain.data.tokenizer import (
    DEFAULT_EOS,
    Bos,
    ModelTokens,
    is_model_spec,
    load_tokenizer,
    model_directory,
    model_tokens,
    post_processor_prefix,
    train_bpe,
)
from midtrain.errors import MidtrainError


def tokenizer_spec_hash(config: PrepareConfig, plans: list[Plan]) -> str:
    """What the tokenizer depends on (for a trained one: its sample's sources too)."""
    spec: dict[str, Any] = {"tokenizer": asdict(config.tokenizer), "seed": config.seed}
    spec["tokenizer"]["eos"] = config.tokenizer.eos or DEFAULT_EOS  # what None means
    if config.tokenizer.path is not None and Path(config.tokenizer.path).is_file():
        spec["file"] = hashlib.sha256(Path(config.tokenizer.path).read_bytes()).hexdigest()
    if config.tokenizer.train is not None:  # a trained tokenizer depends on its sample
        spec["sample"] = [
            (
                p.name,
                source_fingerprint(p.source),
                _without_none(asdict(p.template), "chat_template"),
                p.config.val_fraction,
                p.config.max_docs,
            )
            for p in plans
        ]
    return hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _stored(root: Path, spec_hash: str) -> Tokenizer | None:
    """The store's own tokenizer, or the one shared with the shards, when made from this spec."""
    index = StoreIndex.find(root)
    own = root / TOKENIZER_FILE
    if index is not None and own.is_file() and index.tokenizer_spec == spec_hash:
        return Tokenizer.from_file(str(root / TOKENIZER_FILE))
    shared = root / SHARDS / TOKENIZER_FILE  # trained once for the shards (--tokenizer_only)
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
    eos = tk.eos or DEFAULT_EOS
    return train_bpe(sample(), train.vocab_size, eos, train.min_frequency), spec_hash


def _without_none(values: dict[str, Any], *keys: str) -> dict[str, Any]:
    """Keys added later, dropped when unset: older stores keep their fingerprints."""
    return {k: v for k, v in values.items() if not (k in keys and v is None)}


def model_conventions(config: PrepareConfig) -> ModelTokens | None:
    """EOS, BOS and chat template of the model directory ``tokenizer.hub`` names, if it names
    one (a bare hub name or a tokenizer file says none of these)."""
    hub = config.tokenizer.hub
    if hub is None or not is_model_spec(hub):
        return None
    directory = model_directory(hub)
    return model_tokens(directory, Tokenizer.from_file(str(directory / TOKENIZER_FILE)))


def with_model_eos(config: PrepareConfig, tokens: ModelTokens | None) -> PrepareConfig:
    """The config with ``tokenizer.eos`` resolved: as given, else the model's, else the
    default ``<|endoftext|>``."""
    eos = config.tokenizer.eos or (tokens.eos if tokens is not None else None) or DEFAULT_EOS
    return replace(config, tokenizer=replace(config.tokenizer, eos=eos))


def document_prefix(tok: Tokenizer, tokens: ModelTokens | None) -> list[int]:
    """Token ids in front of every document: the BOS where the model's tokenizer adds one,
    else whatever the tokenizer's post-processor puts in front of a text (usually nothing)."""
    if tokens is not None:
        bos = tok.token_to_id(tokens.bos) if tokens.add_bos and tokens.bos else None
        return [bos] if bos is not None else []
    return post_processor_prefix(tok)


def document_bos(tok: Tokenizer, tokens: ModelTokens | None, prefix: list[int]) -> Bos:
    """The store's BOS convention (recorded in its index): the token in front of every
    document, else the BOS the model's directory names (not added, e.g. SmolLM2's)."""
    if prefix:
        return Bos(prefix[0], True)
    named = tokens.bos if tokens is not None else None
    return Bos(tok.token_to_id(named) if named else None, False)


def bind_chat_templates(plans: list[Plan], tokens: ModelTokens | None, eos: str) -> None:
    """Load each ``chat_template`` (``tokenizer``: the model directory's; else a file) and
    bind it to its domain's template; a missing or invalid one is refused in one line."""
    for p in plans:
        value = p.template.chat_template
        if value is None:
            continue
        where = f"{p.where}.chat_template"
        if value == "tokenizer":
            source, name = _tokenizer_template(tokens, where)
        else:
            if not Path(value).is_file():
                raise MidtrainError(
                    f"{where}: file not found: {value}; give `tokenizer` or a .jinja file"
                )
            source, name = Path(value).read_text(encoding="utf-8"), value
        special = tokens.special if tokens is not None else {"eos_token": eos}
        renderer = ChatTemplate(source, name, special)
        try:
            renderer.compile()
        except MidtrainError as e:
            raise MidtrainError(f"{where}: {e}") from None
        p.template.bind(renderer)


def _tokenizer_template(tokens: ModelTokens | None, where: str) -> tuple[str, str]:
    if tokens is None:
        raise MidtrainError(
            f"{where}: `tokenizer` means the chat template of the model directory named by "
            "tokenizer.hub (hf:<dir or id>); give that, or a .jinja file"
        )
    if tokens.chat_template is None:
        raise MidtrainError(
            f"{where}: {tokens.directory} has no chat template (no chat_template.jinja, no "
            "chat_template in tokenizer_config.json); give a .jinja file"
        )
    file = tokens.directory / "chat_template.jinja"
    name = file if file.is_file() else tokens.directory / "tokenizer_config.json"
    return tokens.chat_template, str(name)


def save_for_shards(root: Path, tok: Tokenizer, spec_hash: str) -> Path:
    """``--tokenizer_only``: the tokenizer every ``--shard`` run of this config loads."""
    (root / SHARDS).mkdir(parents=True, exist_ok=True)
    tmp = root / SHARDS / f".tokenizer-{os.getpid()}.json"
    tok.save(str(tmp))
    (root / SHARDS / "tokenizer.spec").write_text(spec_hash)
    os.replace(tmp, root / SHARDS / TOKENIZER_FILE)
    return root / SHARDS / TOKENIZER_FILE


def chat_encoder(tok: Tokenizer) -> Callable[[list[list[str]]], list[list[list[int]]]]:
    """Per document (its segments' texts): the whole text's token ids, special tokens parsed
    as ``apply_chat_template(tokenize=True)`` parses them, cut where the segments meet (a
    token belongs to the segment holding its first character)."""
    tok.encode_special_tokens = False  # the template's <|im_start|> etc. are special tokens

    def run(docs: list[list[str]]) -> list[list[list[int]]]:
        out = []
        encodings = tok.encode_batch(["".join(d) for d in docs], add_special_tokens=False)
        for texts, enc in zip(docs, encodings, strict=True):
            ends = list(accumulate(len(t) for t in texts))
            pieces: list[list[int]] = [[] for _ in texts]
            k = 0
            for token, (start, _) in zip(enc.ids, enc.offsets, strict=True):
                while k < len(ends) - 1 and start >= ends[k]:
                    k += 1
                pieces[k].append(token)
            out.append(pieces)
        return out

    return run


def encoder(tok: Tokenizer) -> Callable[[list[str]], list[list[int]]]:
    """Token ids of each text, no special tokens added."""
    # A literal EOS string inside a document is text, not the end of the document.
    tok.encode_special_tokens = True
    encode = getattr(tok, "encode_batch_fast", tok.encode_batch)  # skips offsets if it can

    def run(texts: list[str]) -> list[list[int]]:
        return [e.ids for e in encode(texts, add_special_tokens=False)]

    return run
