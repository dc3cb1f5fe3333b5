"""Token-statistics similarity between datasets (the study's proximity measure).

For two datasets A and B (seeded document samples of token stores, one tokenizer):

* ``V`` = the K most frequent tokens of A together with those of B; ``p``, ``q`` = A's and B's
  token frequencies restricted to ``V``, normalised.
* similarity = 0.4 · cosine(p, q) + 0.3 · Jaccard(topK(A), topK(B)) + 0.3 / (1 + JSD(p, q)),
  with the Jensen–Shannon divergence in bits (in [0, 1]). Identical data gives 1.0; data with
  disjoint vocabularies gives 0.3 / 2 = 0.15.
* distance = 1 − similarity. A mixture is the weighted blend of its domains' distributions; the
  proximity advantage of a midtraining mix M for an SFT set T, relative to the pretraining
  mixture P it replaces, is dist(P, T) − dist(M, T).
"""

from __future__ import annotations

import csv
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from midtrain.data.mixture import permute
from midtrain.data.store import Store
from midtrain.errors import MidtrainError


def token_counts(
    store: Store, domain: str, num_docs: int, seed: int = 0, split: str = "train"
) -> np.ndarray:
    """Token counts (vocab-sized) of a seeded sample of ``num_docs`` documents."""
    s = store.domain(domain).split(split)
    if s.num_docs == 0:
        raise MidtrainError(f"similarity: domain {domain!r} has no {split} documents")
    n = min(num_docs, s.num_docs)
    docs = permute(np.arange(n), s.num_docs, key=seed * 7919 + 17)
    counts = np.zeros(store.vocab_size, dtype=np.int64)
    for d in docs:
        counts += np.bincount(s.document(int(d)), minlength=store.vocab_size)
    return counts


def _top(counts: np.ndarray, k: int) -> set[int]:
    nonzero = np.flatnonzero(counts)
    order = nonzero[np.argsort(-counts[nonzero], kind="stable")]
    return set(order[:k].tolist())


def similarity(a: np.ndarray, b: np.ndarray, top_k: int = 1000) -> float:
    """0.4 cosine + 0.3 Jaccard of top-K vocabularies + 0.3 / (1 + JSD in bits)."""
    top_a, top_b = _top(a, top_k), _top(b, top_k)
    vocab = np.array(sorted(top_a | top_b), dtype=np.int64)
    if vocab.size == 0:
        raise MidtrainError("similarity: empty token counts")
    p = a[vocab].astype(np.float64)
    q = b[vocab].astype(np.float64)
    p, q = p / max(p.sum(), 1e-300), q / max(q.sum(), 1e-300)
    cosine = float(p @ q / (np.linalg.norm(p) * np.linalg.norm(q)))
    jaccard = len(top_a & top_b) / len(top_a | top_b)
    m = (p + q) / 2

    def kl(x: np.ndarray) -> float:
        nz = x > 0
        return float((x[nz] * np.log2(x[nz] / m[nz])).sum())

    jsd = 0.5 * kl(p) + 0.5 * kl(q)
    return 0.4 * cosine + 0.3 * jaccard + 0.3 / (1.0 + jsd)


def blend(counts: Mapping[str, np.ndarray], weights: Mapping[str, float]) -> np.ndarray:
    """The token distribution of a mixture: each domain's distribution at its weight
    (scaled to a pseudo-count so ``similarity`` can take it like any dataset)."""
    total = sum(weights.values())
    if total <= 0:
        raise MidtrainError("similarity.mixtures: weights are all zero")
    dist = sum(w / total * counts[d] / counts[d].sum() for d, w in weights.items() if w > 0)
    return np.round(dist * 1e12).astype(np.int64)


def similarity_matrix(
    store: Store,
    domains: Sequence[str],
    num_docs: int = 500,
    top_k: int = 1000,
    seed: int = 0,
    mixtures: Mapping[str, Mapping[str, float]] | None = None,
) -> tuple[list[str], np.ndarray]:
    counts = {d: token_counts(store, d, num_docs, seed) for d in domains}
    for name, weights in (mixtures or {}).items():
        for d in weights:
            if d not in counts:
                counts[d] = token_counts(store, d, num_docs, seed)
        counts[name] = blend(counts, weights)
    names = [*domains, *(mixtures or {})]
    matrix = np.array([[similarity(counts[a], counts[b], top_k) for b in names] for a in names])
    return names, matrix


def distance(a: np.ndarray, b: np.ndarray, top_k: int = 1000) -> float:
    """1 − similarity."""
    return 1.0 - similarity(a, b, top_k)


def proximity_advantage(
    counts: Mapping[str, np.ndarray],
    pretraining: Mapping[str, float],
    mix: Mapping[str, float],
    target: np.ndarray,
    top_k: int = 1000,
) -> float:
    """How much closer a midtraining mixture brings the data to an SFT target than the
    pretraining mixture it replaces: dist(blend(pretraining), T) − dist(blend(mix), T), each
    mixture the blend of its domains' token ``counts`` (positive: the mix is closer)."""
    return distance(blend(counts, pretraining), target, top_k) - distance(
        blend(counts, mix), target, top_k
    )


def to_markdown(names: list[str], matrix: np.ndarray) -> str:
    lines = ["| | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for n, row in zip(names, matrix, strict=True):
        lines.append(f"| {n} | " + " | ".join(f"{v:.3f}" for v in row) + " |")
    return "\n".join(lines)


def write_matrix(names: list[str], matrix: np.ndarray, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    with (out / "similarity.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["", *names])
        for n, row in zip(names, matrix, strict=True):
            w.writerow([n, *(f"{v:.6f}" for v in row)])
    (out / "similarity.md").write_text(to_markdown(names, matrix) + "\n")


def run(
    store: str,
    domains: list[str],
    num_docs: int = 500,
    top_k: int = 1000,
    seed: int = 0,
    mixtures: dict[str, dict[str, float]] | None = None,
    out: str | None = None,
) -> None:
    """Similarity matrix of a store's domains (and mixtures of them), as CSV and markdown.

    Args:
        store: a token store (``midtrain prepare``).
        domains: domains to compare.
        num_docs: documents sampled per domain (seeded).
        top_k: size of each dataset's top-token vocabulary.
        seed: sampling seed.
        mixtures: name -> {domain: weight}: blends compared like datasets (mixture-aware).
        out: directory for similarity.csv and similarity.md (default: print only).
    """
    s = Store(store)
    for d in domains:
        s.domain(d)
    if not domains:
        raise MidtrainError("similarity.domains: name at least one domain")
    names, matrix = similarity_matrix(s, domains, num_docs, top_k, seed, mixtures)
    print(to_markdown(names, matrix))
    if out:
        write_matrix(names, matrix, Path(out))
        print(f"written {Path(out) / 'similarity.csv'} and similarity.md")
    if not math.isfinite(float(matrix.sum())):
        raise MidtrainError("similarity: a value is not finite")
