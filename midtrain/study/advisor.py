"""The mixture advisor (``midtrain advise``): ranks candidate midtraining mixtures for each SFT
target from token statistics alone, before anything is trained.

For a target T and a candidate (a branch in the study's syntax: a domain mixed in at weight w
from step s, or a switch to given weights at step s), with P the pretraining mixture, M the
candidate's mixture after its switch and S the mixture **seen by the end of pretraining** (P for
s of the ``max_steps`` steps, M for the rest, by tokens):

* ``proximity``: the paper's proximity advantage dist(P, T) − dist(M, T)
  (``similarity.proximity_advantage``); blind to the start step.
* ``proximity_seen``: dist(P, T) − dist(S, T), the same measure on the data the model has seen
  at the SFT point, so an earlier start or a larger weight counts for more (the default ranking).
* ``unigram_gain``: H(T, P) − H(T, S) in bits per token: the cross-entropy a unigram model of
  the seen data (mixed with the uniform distribution at 0.1%) saves on T, a zeroth-order
  stand-in for the in-domain loss.
* ``retention``: −KL(P ‖ S) in bits per token: how far the seen data drifts from the pretraining
  data; 0 for the baseline, more negative predicts more forgetting. Independent of T.

The ranking predictor gets a percentile interval from a bootstrap over the target's documents.
"""

from __future__ import annotations

import csv
import json
import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from midtrain.data.store import Store
from midtrain.errors import MidtrainError
from midtrain.study.config import ExperimentConfig, PretrainConfig, SFTConfig, expand_branches
from midtrain.study.similarity import Proximity, sample_documents, token_counts

PREDICTORS = ("proximity", "proximity_seen", "unigram_gain", "retention")
TARGET_KEYS = {"store", "target", "file", "text"}
SMOOTHING = 1e-3  # the uniform share of a unigram model: an unseen token costs ~log2(V / 1e-3)


@dataclass(frozen=True)
class Candidate:
    """A midtraining candidate: ``weights`` from step ``start`` on (None: the baseline)."""

    name: str
    domain: str | None = None
    start: int | None = None
    weights: dict[str, float] | None = None

    @property
    def weight(self) -> float | None:
        """The share of the candidate's domain after its switch."""
        if self.weights is None or self.domain is None:
            return None
        return self.weights.get(self.domain, 0.0) / sum(self.weights.values())


@dataclass(frozen=True)
class Prediction:
    """One candidate for one target: its rank (1 = best) by ``predicted`` (the ranking
    predictor's value, with a bootstrap interval ``low``..``high``) and every feature."""

    target: str
    candidate: Candidate
    rank: int
    predicted: float
    low: float
    high: float
    features: dict[str, float]


@dataclass(frozen=True)
class Advice:
    """The advisor's answer: predictions per target, best first."""

    rank_by: str
    predictions: list[Prediction]
    target_tokens: dict[str, int] = field(default_factory=dict)

    def for_target(self, target: str) -> list[Prediction]:
        return [p for p in self.predictions if p.target == target]


def normalized(weights: Mapping[str, float]) -> dict[str, float]:
    total = sum(weights.values())
    return {d: w / total for d, w in weights.items() if w > 0}


def seen_mixture(
    pretraining: Mapping[str, float], candidate: Candidate, max_steps: int
) -> dict[str, float]:
    """The data seen by the end of pretraining, by tokens: P before the switch, M after."""
    pre = normalized(pretraining)
    if candidate.weights is None or candidate.start is None:
        return pre
    before, mix = candidate.start / max_steps, normalized(candidate.weights)
    return {d: before * pre.get(d, 0.0) + (1 - before) * mix.get(d, 0.0) for d in {*pre, *mix}}


def log_probs(counts: Mapping[str, np.ndarray], weights: Mapping[str, float]) -> np.ndarray:
    """log2 of a mixture's unigram distribution, mixed with the uniform one at ``SMOOTHING``
    (after blending, so a small domain gets no more smoothing mass than a large one)."""
    mix = normalized(weights)
    p = sum(w * counts[d] / counts[d].sum() for d, w in mix.items())
    return np.log2((1 - SMOOTHING) * p + SMOOTHING / p.size)


@dataclass
class _Context:
    """What every target shares: domain counts, P, and per candidate M and S."""

    counts: dict[str, np.ndarray]
    pretraining: dict[str, float]
    candidates: list[Candidate]
    seen: list[dict[str, float]]
    top_k: int

    def __post_init__(self) -> None:
        self.proximity = Proximity(self.counts, self.pretraining, self.top_k)
        self.mixes = [c.weights or self.pretraining for c in self.candidates]
        self.log_p = log_probs(self.counts, self.pretraining)
        self.log_s = np.stack([log_probs(self.counts, s) for s in self.seen], axis=1)
        p = np.exp2(self.log_p)
        self.retention = -(p @ (self.log_p[:, None] - self.log_s))

    def feature(self, name: str, t: np.ndarray) -> np.ndarray:
        """One predictor for every candidate, for target token counts ``t``."""
        if name == "retention":
            return self.retention
        if name == "unigram_gain":
            return (t / t.sum()) @ (self.log_s - self.log_p[:, None])
        return self.proximity.advantages(self.seen if name == "proximity_seen" else self.mixes, t)


def bootstrap(
    docs: Sequence[np.ndarray],
    vocab: int,
    replicates: int,
    seed: int,
    stat: Callable[[np.ndarray], np.ndarray],
) -> np.ndarray:
    """``stat`` of the target's token counts over documents resampled with replacement:
    (replicates, candidates)."""
    # (document, token) pairs with their counts: a resample is one weighted bincount of these
    pairs, per_pair = np.unique(
        np.concatenate([i * vocab + d.astype(np.int64) for i, d in enumerate(docs)]),
        return_counts=True,
    )
    doc_of, token_of = np.divmod(pairs, vocab)
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(replicates):
        times = np.bincount(rng.integers(0, len(docs), len(docs)), minlength=len(docs))
        out.append(stat(np.bincount(token_of, weights=times[doc_of] * per_pair, minlength=vocab)))
    return np.array(out)


def file_texts(path: str, template: str, where: str) -> list[str]:
    """Documents of a data file: .jsonl/.json records through ``template`` (a format string of
    their fields), or .txt paragraphs (separated by blank lines)."""
    p = Path(path)
    if not p.is_file():
        raise MidtrainError(f"{where}.file: file not found: {path}")
    raw = p.read_text(encoding="utf-8-sig")
    suffix = p.suffix.lower()
    if suffix == ".txt":
        return [b.strip() for b in re.split(r"\n\s*\n", raw) if b.strip()]
    if suffix not in (".jsonl", ".json"):
        raise MidtrainError(f"{where}.file: {path}: give a .jsonl, .json or .txt file")
    try:
        records = (
            json.loads(raw)
            if suffix == ".json"
            else [json.loads(x) for x in raw.splitlines() if x.strip()]
        )
        return [template.format_map(r) for r in records]
    except json.JSONDecodeError as e:
        raise MidtrainError(f"{where}.file: {path} is not valid JSON ({e})") from None
    except (KeyError, TypeError, AttributeError) as e:
        raise MidtrainError(
            f"{where}.text: {template!r} needs field {e} that the records of {path} lack"
        ) from None


def target_documents(
    name: str, spec: Mapping[str, Any], store: Store, num_docs: int, seed: int, min_tokens: int
) -> list[np.ndarray]:
    """The seeded document sample of one target, in the pretraining store's tokens."""
    where = f"targets.{name}"
    if (
        not isinstance(spec, Mapping)
        or set(spec) - TARGET_KEYS
        or ("target" in spec) == ("file" in spec)
    ):
        raise MidtrainError(
            f"{where}: give `target` (an SFT domain, with `store`, default the pretraining "
            "store) or `file` (.jsonl/.json with `text`, or .txt)"
        )
    if "file" in spec:
        texts = file_texts(str(spec["file"]), str(spec.get("text", "{text}")), where)
        if not texts:
            raise MidtrainError(f"{where}.file: {spec['file']} holds no documents")
        from midtrain.data.tokenizer import load_tokenizer

        tok = load_tokenizer(str(store.tokenizer_path))
        texts = [texts[int(i)] for i in sample_documents(len(texts), num_docs, seed)]
        docs = [
            np.array(e.ids, dtype=np.int64)
            for e in tok.encode_batch(texts, add_special_tokens=False)
        ]
        what = str(spec["file"])
    else:
        s = store if spec.get("store") is None else Store(str(spec["store"]))
        if s.tokenizer_hash != store.tokenizer_hash:
            raise MidtrainError(
                f"{where}.store: {s.root} was tokenized with another tokenizer than {store.root}; "
                "prepare it with the pretraining tokenizer"
            )
        try:
            split = s.domain(str(spec["target"])).train
        except MidtrainError as e:
            raise MidtrainError(f"{where}.target: {e}") from None
        docs = [split.document(int(i)) for i in sample_documents(split.num_docs, num_docs, seed)]
        what = f"{s.root}/{spec['target']}"
    tokens = sum(len(d) for d in docs)
    if tokens < min_tokens or len(docs) < 2:
        raise MidtrainError(
            f"{where}: {what} gives {tokens} tokens in {len(docs)} sampled documents; the measure "
            f"needs at least {min_tokens} tokens (min_tokens) in 2 documents: give a larger "
            "target or raise num_docs"
        )
    return docs


def candidates_of(
    store: Store, pretraining: Mapping[str, float], branches: Mapping[str, Any], max_steps: int
) -> list[Candidate]:
    """The baseline and every branch (the study's ``branches`` syntax), checked."""
    for d in pretraining:
        if d not in store.domain_names:
            raise MidtrainError(
                f"pretraining: domain {d!r} is not in the store {store.root} "
                f"(known: {', '.join(store.domain_names)})"
            )
    out = [Candidate("baseline")]
    for key, b in branches.items():  # one at a time, so an error names the key
        stub = ExperimentConfig("", "", PretrainConfig([]), SFTConfig([], {}, []), {key: b})
        for name, x in expand_branches(stub, dict(pretraining)).items():
            if x["step"] is None:
                continue
            for d in x["weights"]:
                if d not in store.domain_names:
                    raise MidtrainError(
                        f"branches.{key}: candidate domain {d!r} is not in the store "
                        f"{store.root} (known: {', '.join(store.domain_names)})"
                    )
            if not 0 <= x["step"] < max_steps:
                raise MidtrainError(
                    f"branches.{key}: start step {x['step']} is not in [0, max_steps={max_steps})"
                )
            out.append(Candidate(name, x["domain"], x["step"], x["weights"]))
    return out


def check_settings(rank_by: str, num_docs: int, top_k: int, bootstrap: int, max_steps: int) -> None:
    if rank_by not in PREDICTORS:
        raise MidtrainError(f"rank_by: {rank_by!r} is not one of {', '.join(PREDICTORS)}")
    if num_docs < 2 or top_k < 1 or bootstrap < 0:
        raise MidtrainError("num_docs >= 2, top_k >= 1 and bootstrap >= 0, please")
    if max_steps <= 0:
        raise MidtrainError("max_steps: give the pretraining run's steps (> 0)")


def predict(
    store: Store,
    pretraining: Mapping[str, float],
    candidates: list[Candidate],
    targets: Mapping[str, list[np.ndarray]],
    max_steps: int,
    rank_by: str = "proximity_seen",
    num_docs: int = 200,
    top_k: int = 1000,
    bootstrap_replicates: int = 200,
    seed: int = 0,
) -> Advice:
    """Features of every candidate for every target (documents sampled already), ranked."""
    domains = sorted({*pretraining, *(d for c in candidates for d in c.weights or {})})
    ctx = _Context(
        counts={d: token_counts(store, d, num_docs, seed) for d in domains},
        pretraining=normalized(pretraining),
        candidates=candidates,
        seen=[seen_mixture(pretraining, c, max_steps) for c in candidates],
        top_k=top_k,
    )
    predictions = []
    for target, docs in targets.items():
        t = np.bincount(np.concatenate(docs), minlength=store.vocab_size)
        features = {name: ctx.feature(name, t) for name in PREDICTORS}
        draws = bootstrap(
            docs, store.vocab_size, bootstrap_replicates, seed, lambda x: ctx.feature(rank_by, x)
        )
        interval = (
            np.percentile(draws, [2.5, 97.5], axis=0)
            if bootstrap_replicates
            else np.full((2, len(candidates)), math.nan)
        )
        order = sorted(range(len(candidates)), key=lambda i: (-features[rank_by][i], i))
        for rank, i in enumerate(order, 1):
            low, high = float(interval[0, i]), float(interval[1, i])
            predictions.append(
                Prediction(
                    target,
                    candidates[i],
                    rank,
                    float(features[rank_by][i]),
                    low,
                    high,
                    {name: float(v[i]) for name, v in features.items()},
                )
            )
    tokens = {t: int(sum(len(d) for d in docs)) for t, docs in targets.items()}
    return Advice(rank_by, predictions, tokens)


def advise(
    store: str,
    pretraining: dict[str, float],
    branches: dict[str, dict[str, Any]],
    targets: dict[str, dict[str, str]],
    max_steps: int,
    rank_by: str = "proximity_seen",
    num_docs: int = 200,
    top_k: int = 1000,
    min_tokens: int = 1000,
    bootstrap: int = 200,
    seed: int = 0,
) -> Advice:
    """Rank candidate midtraining mixtures for every SFT target by token statistics.

    Args:
        store: the pretraining token store (``midtrain prepare``).
        pretraining: the pretraining mixture, domain -> weight.
        branches: the candidates, in the study's syntax: name -> ``{grid: {domain, start:
            [steps], weight: [weights]}}`` or ``{switch: {step, weights}}``.
        targets: name -> ``{target: <SFT domain>, store: <its store>}`` (the store defaults to
            ``store``; same tokenizer) or ``{file: <.jsonl/.json>, text: "{field} ..."}`` or
            ``{file: <.txt>}`` (paragraphs), tokenized with the store's tokenizer.
        max_steps: the pretraining run's steps (where SFT starts).
        rank_by: the ranking predictor: proximity, proximity_seen, unigram_gain or retention.
        num_docs: documents sampled per domain and target (seeded).
        top_k: size of each dataset's top-token vocabulary (the similarity).
        min_tokens: fewest target tokens the measure accepts.
        bootstrap: resamples of the target's documents for the interval (0: none).
        seed: sampling and bootstrap seed.
    """
    check_settings(rank_by, num_docs, top_k, bootstrap, max_steps)
    s = Store(store)
    if not targets:
        raise MidtrainError("targets: name at least one SFT target")
    candidates = candidates_of(s, pretraining, branches, max_steps)
    docs = {
        name: target_documents(name, spec, s, num_docs, seed, min_tokens)
        for name, spec in targets.items()
    }
    return predict(
        s, pretraining, candidates, docs, max_steps, rank_by, num_docs, top_k, bootstrap, seed
    )


def _fmt(x: float | None, spec: str = "+.4f") -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def prediction_row(p: Prediction, rank_by: str) -> dict[str, Any]:
    c = p.candidate
    return {
        "target": p.target,
        "rank": p.rank,
        "candidate": c.name,
        "domain": c.domain or "",
        "start": "" if c.start is None else c.start,
        "weight": "" if c.weight is None else round(c.weight, 6),
        "rank_by": rank_by,
        "predicted": p.predicted,
        "low": p.low,
        "high": p.high,
        **p.features,
    }


def to_markdown(advice: Advice) -> str:
    features = list(advice.predictions[0].features) if advice.predictions else list(PREDICTORS)
    head = f"| target | rank | candidate | {advice.rank_by} | 95% interval |"
    head += "".join(f" {f} |" for f in features if f != advice.rank_by)
    lines = [head, "|---" * (head.count("|") - 1) + "|"]
    for p in advice.predictions:
        line = (
            f"| {p.target} | {p.rank} | {p.candidate.name} | {_fmt(p.predicted)} | "
            f"[{_fmt(p.low)}, {_fmt(p.high)}] |"
        )
        line += "".join(f" {_fmt(v)} |" for f, v in p.features.items() if f != advice.rank_by)
        lines.append(line)
    return "\n".join(lines)


def write_advice(advice: Advice, out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    rows = [prediction_row(p, advice.rank_by) for p in advice.predictions]
    with (out / "advice.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    (out / "advice.md").write_text(to_markdown(advice) + "\n")
    return out / "advice.csv"
