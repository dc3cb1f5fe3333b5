"""What ``midtrain prepare`` shows: a progress bar per domain counting documents and tokens
as batches are written, and the closing summary (also written as
``<store>/prepare-summary.json``)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from tqdm import tqdm

from midtrain.data.prepare.plan import Plan
from midtrain.data.sources import known_length

SUMMARY = "prepare-summary.json"
NEXT = "midtrain fit --config <pretrain.yaml> --data.store {store}"


class DomainProgress:
    """A domain's bar: documents against the source's length where it is known (capped by
    ``max_docs``), else counting up; the tokens so far beside them."""

    def __init__(self, plan: Plan, label: str = "") -> None:
        total = known_length(plan.source)
        if plan.config.max_docs is not None:
            total = min(total or plan.config.max_docs, plan.config.max_docs)
        self.tokens = 0
        self.bar = tqdm(
            desc=f"prepare {plan.name}{label}",
            total=total,
            unit=" docs",
            mininterval=1.0,
            dynamic_ncols=True,
        )

    def __call__(self, docs: int, tokens: int) -> None:
        self.tokens += tokens
        self.bar.set_postfix_str(f"{self.tokens:,} tokens", refresh=False)
        self.bar.update(docs)

    def finish(self, result: dict[str, Any] | None) -> None:
        """End on the domain's real counts (skipped records and caps make them differ from
        the source's length; parallel shards each keep up to the cap before the merge)."""
        if result is not None:
            docs = sum(s["docs"] for s in result["splits"].values())
            self.tokens = sum(s["tokens"] for s in result["splits"].values())
            self.bar.n = docs
            if self.bar.total is not None:  # a counting-up bar stays one
                self.bar.total = docs
            self.bar.set_postfix_str(f"{self.tokens:,} tokens", refresh=False)
        self.bar.close()


def summary(
    root: Path,
    plans: list[Plan],
    built: dict[str, dict[str, Any]],
    reused: dict[str, dict[str, Any]],
    seconds: dict[str, float],
    wall: float,
) -> dict[str, Any]:
    """The run in numbers: per domain its state and train/val docs and tokens, and the wall
    time and throughput of the domains built."""
    domains = {}
    for p in plans:
        m = built.get(p.name) or reused[p.name]
        domains[p.name] = {
            "state": "built" if p.name in built else "reused",
            **{s: {k: m["splits"][s][k] for k in ("docs", "tokens")} for s in ("train", "val")},
            "skipped_empty": m.get("skipped_empty", 0),
            **({"seconds": round(seconds[p.name], 3)} if p.name in seconds else {}),
        }
    tokens = sum(d["train"]["tokens"] + d["val"]["tokens"] for d in domains.values())
    new = sum(d["train"]["tokens"] + d["val"]["tokens"] for n, d in domains.items() if n in built)
    return {
        "store": str(root),
        "domains": domains,
        "tokens": tokens,
        "tokens_built": new,
        "wall_seconds": round(wall, 3),
        "tokens_per_second": round(new / max(wall, 1e-9)),
        "next": NEXT.format(store=root),
    }


def write_summary(root: Path, report: dict[str, Any]) -> Path:
    path = root / SUMMARY
    tmp = path.with_name(f".{SUMMARY}.{os.getpid()}")
    tmp.write_text(json.dumps(report, indent=2) + "\n")
    os.replace(tmp, path)
    return path


def print_summary(report: dict[str, Any], written: Path | None) -> None:
    """The run's totals and the next command, then the per-domain table (the last lines)."""
    wall = report["wall_seconds"]
    if report["tokens_built"]:
        print(
            f"built {report['tokens_built']:,} tokens in {wall:.1f}s "
            f"({report['tokens_per_second']:,} tokens/s); the store holds {report['tokens']:,}"
        )
    else:
        print(f"nothing to build: every domain reused ({wall:.1f}s)")
    if written is not None:
        print(f"summary: {written}")
    print(f"next: {report['next']}")
    print(f"store {report['store']}:")
    print(
        f"  {'domain':<16} {'state':<7} {'train docs':>10} {'train tokens':>13} "
        f"{'val docs':>8} {'val tokens':>11} {'skipped empty':>13}"
    )
    for name, d in report["domains"].items():
        tr, va = d["train"], d["val"]
        print(
            f"  {name:<16} {d['state']:<7} {tr['docs']:>10,} {tr['tokens']:>13,} "
            f"{va['docs']:>8,} {va['tokens']:>11,} {d['skipped_empty']:>13,}"
        )
