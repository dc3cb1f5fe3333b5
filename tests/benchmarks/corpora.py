"""Loader speed (both shuffled) over a pretokenized domain read in place: a 1 GB Megatron ``.bin`` (2049-token
items, its index written by megatron-core's own index writer) against the same bytes as a store
midtrain prepared itself (the ``.tokens`` file is a hard link to the ``.bin``), and the peak RSS
of both loaders (memory-mapped files: RSS does not follow the corpus size)."""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np

from tests.benchmarks.run import PEAK_RSS, REPO, synthetic_store

ITEM = 2049
LOADER = (
    PEAK_RSS
    + r"""
import resource, sys, time
from torch.utils.data import DataLoader
from midtrain.data.streams import BatchLayout, MixtureStream
from midtrain.data.mixture import MixtureSchedule, Phase
from midtrain.data.store import Store
s, name = Store(sys.argv[1]), sys.argv[2]
sched = MixtureSchedule([name], [Phase(0, {name: 1.0})], batch_size=16, seed=0)
stream = MixtureStream([s.domain(name).train], sched, 2048, BatchLayout(16), 0, 300)
t0 = time.perf_counter(); n = 0
for batch in DataLoader(stream, batch_size=None, num_workers=2, prefetch_factor=2):
    n += batch["input_ids"].shape[0]
print(n / (time.perf_counter() - t0), peak_rss_kb(), resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
"""
)


def megatron_domain(root: Path, tokens: int) -> Path:
    """A store whose domain `pile` reads a Megatron prefix of random uint16 tokens in place, and
    a store of the same bytes in midtrain's own layout (domain `big`)."""
    from midtrain.data.prepare import DomainConfig, PrepareConfig, TokenizerConfig, prepare
    from midtrain.data.tokenizer import train_bpe

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from megatron.core.datasets.indexed_dataset import _IndexWriter

    native = synthetic_store(root / "native", tokens - tokens % ITEM)  # random ids < 50000
    n = (tokens - tokens % ITEM) // ITEM
    bin_path = root / "pile.bin"
    os.link(native / "big" / "train.tokens", bin_path)
    with _IndexWriter(str(root / "pile.idx"), np.uint16) as writer:
        writer.write([ITEM] * n, None, list(range(n + 1)))
    tok = train_bpe([f"text {i} " * 20 for i in range(200)], 300)
    tok.add_tokens([f"<id{i}>" for i in range(50000 - tok.get_vocab_size())])
    tok.save(str(root / "tokenizer.json"))
    prepare(
        PrepareConfig(
            output=str(root / "tokenized"),
            tokenizer=TokenizerConfig(path=str(root / "tokenizer.json")),
            domains={
                "pile": DomainConfig(
                    source={"format": "megatron", "path": str(root / "pile")},
                    val_fraction=0,
                )
            },
        )
    )
    return root


def _run(store: Path, name: str) -> tuple[float, float]:
    out = subprocess.run(
        [sys.executable, "-c", LOADER, str(store), name],
        capture_output=True, text=True, check=True, cwd=REPO,
    ).stdout.split()  # fmt: skip
    return float(out[0]), (int(out[1]) + int(out[2])) / 1024


def bench_corpora(root: Path, tokens: int = 500_000_000, repeats: int = 3) -> dict:
    root.mkdir(parents=True, exist_ok=True)
    megatron_domain(root, tokens)
    runs: dict[str, list[tuple[float, float]]] = {"megatron": [], "native": []}
    for _ in range(repeats):  # interleaved: both see the same page cache and machine load
        runs["native"].append(_run(root / "native", "big"))
        runs["megatron"].append(_run(root / "tokenized", "pile"))
    out = {
        k: {
            "sequences_per_s": statistics.median(r for r, _ in v),
            "peak_rss_mb": statistics.median(m for _, m in v),
        }
        for k, v in runs.items()
    }
    out["ratio"] = out["megatron"]["sequences_per_s"] / out["native"]["sequences_per_s"]
    out["rss_difference_mb"] = out["megatron"]["peak_rss_mb"] - out["native"]["peak_rss_mb"]
    out["bin_bytes"] = (root / "pile.bin").stat().st_size
    out["goal"] = ">= 0.95"
    return out


def rows(r: dict) -> list[tuple[str, str, str, str]]:
    return [
        (
            "corpora: loader seq/s, 1 GB Megatron .bin / the same tokens prepared",
            f"{r['ratio']:.3f}",
            f"{r['megatron']['sequences_per_s']:,.0f} / {r['native']['sequences_per_s']:,.0f}",
            r["goal"],
        ),
        (
            "corpora: loader peak RSS, Megatron .bin - prepared store (MB)",
            f"{r['rss_difference_mb']:+.0f}",
            f"{r['megatron']['peak_rss_mb']:,.0f} / {r['native']['peak_rss_mb']:,.0f} MB",
            "within 100 MB (memory-mapped)",
        ),
    ]


if __name__ == "__main__":
    import json
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        result = bench_corpora(Path(tmp))
    print(json.dumps(result, indent=2))
    for row in rows(result):
        print(" | ".join(row))
