"""What to rebuild: one ``Plan`` per domain (its resolved source, template and fingerprint),
the output directory's check, and which domains of an existing store can be reused."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from midtrain.data.corpora import resolve_corpus_spec
from midtrain.data.prepare.config import DomainConfig, PrepareConfig, check_config, check_domain
from midtrain.data.sources import Template, resolve_source, source_fingerprint
from midtrain.data.store import FORMAT_VERSION, StoreIndex, check_sizes
from midtrain.errors import MidtrainError

SHARDS = ".shards"  # under the store root: the output of `--shard i/N` runs until `--merge`


@dataclass
class Plan:
    """One domain to prepare; ``fingerprint`` and ``prefix`` (token ids put in front of each
    document: the model's BOS, if its tokenizer adds one) are set once the tokenizer is known."""

    name: str
    config: DomainConfig
    source: dict[str, Any]
    template: Template
    fingerprint: str = ""
    prefix: list[int] = field(default_factory=list)

    @property
    def where(self) -> str:
        return f"domains.{self.name}"


def make_plans(config: PrepareConfig) -> list[Plan]:
    """The config checked, and every domain's source resolved (local files must exist)."""
    check_config(config)
    plans = []
    for name, d in config.domains.items():
        check_domain(name, d)
        where = f"domains.{name}.source"
        source = resolve_corpus_spec(d.source, where) if d.pretokenized else None
        plans.append(Plan(name, d, source or resolve_source(d.source, where), d.template()))
    return plans


def domain_fingerprint(plan: Plan, tok_hash: str, config: PrepareConfig) -> str:
    """Everything a domain's bytes depend on: a changed fingerprint means a rebuild."""
    domain = asdict(plan.config)
    # keys added later, at their defaults: older stores keep their fingerprint
    if domain.get("chat_template") is None:
        domain.pop("chat_template", None)
    if domain.get("order") == "shuffled":
        domain.pop("order", None)
    spec: dict[str, Any] = {
        "format": FORMAT_VERSION,
        "source": plan_source_fingerprint(plan),
        "config": domain,
        "tokenizer": tok_hash,
        "eos": config.tokenizer.eos,
        "seed": config.seed,
    }
    if plan.prefix:
        spec["prefix"] = plan.prefix
    chat = plan.template.renderer
    if chat is not None:  # the template's text, not only its name, decides the bytes
        spec["chat_template"] = [chat.source, chat.special]
    return hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()[:16]


def plan_source_fingerprint(plan: Plan) -> str:
    """The source's identity: local files by size and mtime (pretokenized files too)."""
    if plan.config.pretokenized:
        from midtrain.data.prepare.pretokenized import corpus_identity

        return corpus_identity(plan.source)
    return source_fingerprint(plan.source)


def check_output(root: Path) -> None:
    if root.exists() and not root.is_dir():
        raise MidtrainError(f"output: {root} exists and is not a directory")
    if (
        root.is_dir()
        and any(p.name != SHARDS for p in root.iterdir())
        and not StoreIndex.exists(root)
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


def reusable(plan: Plan, path: Path) -> dict[str, Any] | None:
    """The manifest of the stored domain if it matches the plan and is whole, else None."""
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
