"""A built domain's ``manifest.json`` (counts, provenance, every file's size and sha256), and
``--verify``: every file rehashed against it."""

from __future__ import annotations

import json
import os
from dataclasses import asdict
from pathlib import Path
from typing import Any

from midtrain.data.prepare.plan import Plan, plan_source_fingerprint
from midtrain.data.store import FORMAT_VERSION, content_hash, file_digest, verify
from midtrain.errors import MidtrainError


def write_manifest(
    plan: Plan, out: Path, built: dict[str, Any], eos: int, tok_hash: str
) -> dict[str, Any]:
    """The manifest of the domain just built in ``out``; an empty domain is an error."""
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
    hashed = dict(files)
    if "corpus" in built:  # the files read in place are part of the content, by position
        for i, f in enumerate(built["corpus"]["files"] + built["corpus"]["index"]):
            hashed[f"corpus:{i}"] = f
    manifest = {
        "name": plan.name,
        "format_version": FORMAT_VERSION,
        "fingerprint": plan.fingerprint,
        "content_hash": content_hash(hashed),
        "source": plan.source,
        "source_fingerprint": plan_source_fingerprint(plan),
        "order": plan.config.order,
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
    if "corpus" in built:
        manifest["corpus"] = built["corpus"]
        manifest["vocab_size"] = built["vocab_size"]
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2, default=str))
    return manifest


def verify_store(root: str | os.PathLike) -> None:
    """``midtrain prepare --verify <store>``: rehash every domain's files against its manifest;
    one line per domain, and an error naming the first damaged file."""
    report = verify(root)
    for name, problem in report:
        print(f"  {name:<16} {problem}")
    bad = [(name, problem) for name, problem in report if problem != "ok"]
    if bad:
        raise MidtrainError(f"{len(bad)} of {len(report)} domain(s) damaged; first: {bad[0][1]}")
    print(f"store {root}: {len(report)} domain(s) verified")
