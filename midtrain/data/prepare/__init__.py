"""``midtrain prepare``: render, tokenize and store every domain of a prepare config. Everything
that can be wrong with the input is checked before anything is written (``config``, ``plan``);
the tokenizer is reused, loaded or trained once (``tokenizer``); each domain's records become
documents (``render``), are tokenized in batches, in-process or over a process pool
(``encode``), and sharded and merged byte-identically across processes or nodes (``shards``);
a rebuild happens in a staging folder swapped in only when every domain has succeeded, so a
failed run leaves an existing store exactly as it was (``build``); each domain gets its
manifest (``manifest``), and the run ends with a summary (``console``)."""

from __future__ import annotations

from midtrain.data.prepare.build import prepare
from midtrain.data.prepare.config import (
    DomainConfig,
    PrepareConfig,
    TokenizerConfig,
    TrainTokenizerConfig,
)
from midtrain.data.prepare.console import SUMMARY
from midtrain.data.prepare.manifest import verify_store
from midtrain.data.prepare.plan import SHARDS
from midtrain.data.prepare.render import validation_split

__all__ = [
    "SHARDS",
    "SUMMARY",
    "DomainConfig",
    "PrepareConfig",
    "TokenizerConfig",
    "TrainTokenizerConfig",
    "prepare",
    "validation_split",
    "verify_store",
]
