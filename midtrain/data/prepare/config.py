"""The prepare YAML as dataclasses (``PrepareConfig`` and its sections), and the up-front check
of everything in it that can be wrong before any source is read."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from midtrain.data.sources import Template
from midtrain.data.store import ORDERS
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
    """Exactly one of ``path`` (a tokenizer.json), ``hub`` (a hub name, or a model as
    ``hf:<dir or id>[@revision]``) or ``train``. ``eos`` ends every document: default the
    model's own EOS when ``hub`` names a model (its tokenizer_config.json, else its
    generation_config.json / config.json), else ``<|endoftext|>``."""

    path: str | None = None
    hub: str | None = None
    train: TrainTokenizerConfig | None = None
    eos: str | None = None


@dataclass(kw_only=True)
class DomainConfig(Template):
    """One named domain: a template (the fields of :class:`Template`: ``text``; or ``prompt`` +
    ``response``; or ``chat``, ``chat_turn``, ``train_roles``) applied to a source.

    source: ``datasets.load_dataset`` keyword arguments (``path`` may be a local .jsonl/.json/
      .parquet/.csv/.txt file), or ``{builtin: python-docs|python-stdlib|arithmetic, ...}``.
    mask_prompt: give context tokens (the prompt; chat turns of other roles) loss-mask 0.
      Or pretokenized files read in place: ``{format: megatron|npy|litdata, path: ...}``
      (``midtrain.data.corpora``).
    mask_prompt: give context tokens (the prompt; chat turns of other roles) loss-mask 0.
    val_fraction: this share of documents, evenly spaced, goes to validation (1.0 = eval-only).
    max_docs / max_tokens: stop after this many documents / tokens (useful with streaming).
    order: how training reads the domain: ``shuffled`` (a keyed permutation of its blocks) or
      ``sequential`` (file order: sequence i is tokens [i(seq_len+1), (i+1)(seq_len+1))).
    """

    source: dict[str, Any]
    mask_prompt: bool = True
    val_fraction: float = 0.05
    max_docs: int | None = None
    max_tokens: int | None = None
    order: str = "shuffled"

    @property
    def pretokenized(self) -> bool:
        """Whether the source is token files (``format:``) rather than records to render."""
        return "format" in self.source


@dataclass
class PrepareConfig:
    output: str
    domains: dict[str, DomainConfig]
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    seed: int = 0
    batch_size: int = 1000
    num_proc: int = 1


def check_config(config: PrepareConfig) -> None:
    """The top-level keys and the tokenizer section (domains: :func:`check_domain`)."""
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
    tokenized = [n for n, d in config.domains.items() if d.pretokenized]
    if tokenized and tk.train is not None:
        raise MidtrainError(
            f"tokenizer.train: domain {tokenized[0]!r} is already tokenized; give the tokenizer "
            "its files were made with (tokenizer.path or tokenizer.hub)"
        )


def check_domain(name: str, d: DomainConfig) -> None:
    """A domain's name and numbers (its source and template are checked when read)."""
    where = f"domains.{name}"
    if not _DOMAIN_NAME.match(name):
        raise MidtrainError(f"{where}: domain names use letters, digits, '_', '-', '.'")
    if not 0.0 <= d.val_fraction <= 1.0:
        raise MidtrainError(f"{where}.val_fraction: must be in [0, 1], got {d.val_fraction}")
    for cap in ("max_docs", "max_tokens"):
        if getattr(d, cap) is not None and getattr(d, cap) <= 0:
            raise MidtrainError(f"{where}.{cap}: must be positive")
    if d.order not in ORDERS:
        raise MidtrainError(f"{where}.order: one of {', '.join(ORDERS)}, got {d.order!r}")
    if d.pretokenized and (d.template() != Template() or d.chat_template is not None):
        raise MidtrainError(
            f"{where}: a pretokenized source (format: {d.source['format']}) has no template; "
            "drop text, prompt/response and chat"
        )
