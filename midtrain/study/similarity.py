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
    counts = np.zeros(store.vocab_size, dtype=np.int64)
    for d in sample_documents(s.num_docs, num_docs, seed):
        counts += np.bincount(s.document(int(d)), minlength=store.vocab_size)
    return counts


def sample_documents(available: int, num_docs: int, seed: int = 0) -> np.ndarray:
    """The seeded sample of ``min(num_docs, available)`` document indices every token
    statistic of a dataset is taken on."""
    return permute(np.arange(min(num_docs, available)), available, key=seed * 7919 + 17)


def _top(counts: np.ndarray, k: int) -> frozenset[int]:
    nonzero = np.flatnonzero(counts)
    order = nonzero[np.argsort(-counts[nonzero], kind="stable")]
    return frozenset(order[:k].tolist())


def similarity(a: np.ndarray, b: np.ndarray, top_k: int = 1000) -> float:
    """0.4 cosine + 0.3 Jaccard of top-K vocabularies + 0.3 / (1 + JSD in bits)."""
    return _similarity(a, _top(a, top_k), b, _top(b, top_k))


def _similarity(
    a: np.ndarray, top_a: frozenset[int], b: np.ndarray, top_b: frozenset[int]
) -> float:
    """``similarity`` given each side's top-K vocabulary (the costly part, so callers comparing
    one dataset with many can compute it once)."""
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


class Proximity:
    """dist(P, T) − dist(M, T) of many mixtures M for many targets T over one set of domain
    counts, P the pretraining mixture: each blend and each top-K vocabulary is computed once."""

    def __init__(
        self,
        counts: Mapping[str, np.ndarray],
        pretraining: Mapping[str, float],
        top_k: int = 1000,
    ) -> None:
        self.counts, self.top_k = counts, top_k
        self._mixtures: dict[tuple[tuple[str, float], ...], tuple[np.ndarray, frozenset[int]]] = {}
        self.pretraining = self.mixture(pretraining)

    def mixture(self, weights: Mapping[str, float]) -> tuple[np.ndarray, frozenset[int]]:
        """A mixture's blended counts and top-K vocabulary."""
        key = tuple(sorted((d, float(w)) for d, w in weights.items()))
        if key not in self._mixtures:
            b = blend(self.counts, weights)
            self._mixtures[key] = (b, _top(b, self.top_k))
        return self._mixtures[key]

    def advantages(self, mixes: Sequence[Mapping[str, float]], target: np.ndarray) -> np.ndarray:
        """The proximity advantage of every mix for one target (positive: closer than P)."""
        top = _top(target, self.top_k)
        base = 1.0 - _similarity(*self.pretraining, target, top)
        return np.array([base - (1.0 - _similarity(*self.mixture(m), target, top)) for m in mixes])


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
    return float(Proximity(counts, pretraining, top_k).advantages([mix], target)[0])


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
