"""The mixture: a pure function from (optimizer step, slot in the global batch) to
(domain, block). No state, no I/O: resuming at step N costs the same as starting at 0.

* A schedule is a list of phases, each a start optimizer step and weights over domains.
* Within a phase every global batch holds exactly ``counts[d]`` sequences of domain d: the
  largest-remainder rounding of ``weight[d] * batch_size`` (ties broken by a seeded order), the
  same in every batch of the phase, never drifting with the step. With small batches the
  rounding is visible (0.1 x 16 = 1.6 -> 2); the printed plan (``plan_rows``) shows the exact
  counts and the realized share next to the weight.
* Slots of a step are shuffled with a generator keyed by (seed, step).
* The n-th draw of domain d reads block ``perm_{seed,d,epoch}(n mod num_blocks)``, a keyed
  Feistel permutation: a pure O(1) function of n, whatever the store size.
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np

from midtrain.errors import MidtrainError


@dataclass(frozen=True)
class Phase:
    """From optimizer step ``start_step`` on, draw domains with these (unnormalised) weights."""

    start_step: int
    weights: Mapping[str, float]


def check_weights(weights: Mapping[str, float], known: Sequence[str], where: str) -> None:
    """One-line errors for weights that cannot define a mixture."""
    for name, w in weights.items():
        if name not in known:
            raise MidtrainError(f"{where}: unknown domain {name!r}; known: {', '.join(known)}")
        if not isinstance(w, (int, float)) or not np.isfinite(w) or w < 0:
            raise MidtrainError(f"{where}.{name}: weight must be a finite number >= 0, got {w!r}")
    if not weights or sum(weights.values()) <= 0:
        raise MidtrainError(f"{where}: weights are all zero; give at least one positive weight")


def largest_remainder(weights: np.ndarray, total: int, seed: int) -> np.ndarray:
    """Integers summing to ``total``, each the floor or ceil of ``weights/sum * total``."""
    quotas = np.round(weights / weights.sum() * total, 9)  # round away float noise before ties
    counts = np.floor(quotas).astype(np.int64)
    rest = total - int(counts.sum())
    if rest:
        tiebreak = np.random.default_rng([seed, 0x7A11]).permutation(len(weights))
        order = np.lexsort((tiebreak, -(quotas - counts)))  # largest remainder, then seeded
        counts[order[:rest]] += 1
    return counts


class MixtureSchedule:
    """Per-step domain counts and slot assignment for a list of phases.

    ``domains`` fixes the domain ids (their order); ``batch_size`` is the global batch in
    sequences per optimizer step (micro batch x accumulation x data-parallel size).
    """

    def __init__(
        self, domains: Sequence[str], phases: Sequence[Phase], batch_size: int, seed: int = 0
    ) -> None:
        if batch_size <= 0:
            raise MidtrainError(f"global batch size must be positive, got {batch_size}")
        self.domains = list(domains)
        self.batch_size = batch_size
        self.seed = seed
        phases = sorted(phases, key=lambda p: p.start_step)
        if not phases or phases[0].start_step != 0:
            raise MidtrainError("mixture schedule: the first phase must start at step 0")
        for a, b in zip(phases, phases[1:], strict=False):
            if a.start_step == b.start_step:
                raise MidtrainError(f"mixture schedule: two phases start at step {a.start_step}")
        self.phases = phases
        self.starts = np.array([p.start_step for p in phases], dtype=np.int64)
        self.weights = np.zeros((len(phases), len(self.domains)))
        for i, p in enumerate(phases):
            check_weights(p.weights, self.domains, f"mixture phase at step {p.start_step}")
            for name, w in p.weights.items():
                self.weights[i, self.domains.index(name)] = w
            self.weights[i] /= self.weights[i].sum()
        self.counts = np.stack(
            [largest_remainder(w, batch_size, seed + i) for i, w in enumerate(self.weights)]
        )
        # draws of each domain before each phase starts: cumulative counts in closed form
        lengths = np.diff(self.starts)
        self._before = np.zeros_like(self.counts)
        self._before[1:] = np.cumsum(self.counts[:-1] * lengths[:, None], axis=0)

    def phase_index(self, step: int) -> int:
        return int(np.searchsorted(self.starts, step, side="right")) - 1

    def weights_at(self, step: int) -> dict[str, float]:
        return dict(zip(self.domains, self.weights[self.phase_index(step)].tolist(), strict=True))

    def draws_before(self, step: int) -> np.ndarray:
        """Sequences drawn from each domain in steps [0, step)."""
        p = self.phase_index(step)
        return self._before[p] + self.counts[p] * (step - self.starts[p])

    def draws_between(self, start: int, stop: int) -> np.ndarray:
        return self.draws_before(stop) - self.draws_before(start)

    def step(self, step: int) -> tuple[np.ndarray, np.ndarray]:
        """(domain id, draw number within that domain) for every slot of optimizer step."""
        return _step_draws(self, step)


@lru_cache(maxsize=4)  # the micro-batches of one step share its draws
def _step_draws(sched: MixtureSchedule, step: int) -> tuple[np.ndarray, np.ndarray]:
    p = sched.phase_index(step)
    counts = sched.counts[p]
    rng = np.random.Generator(np.random.Philox(key=(sched.seed << 64) | step))
    domain = rng.permutation(np.repeat(np.arange(len(counts)), counts))
    # within-domain rank of each slot, in slot order
    order = np.argsort(domain, kind="stable")
    first = np.concatenate([[0], np.cumsum(counts)[:-1]])
    rank = np.empty_like(order)
    rank[order] = np.arange(len(order)) - first[domain[order]]
    return domain, sched.draws_before(step)[domain] + rank


# -- the plan: what a schedule will read ------------------------------------------------------


def plan_rows(
    schedule: MixtureSchedule, max_steps: int, seq_len: int, blocks: Mapping[str, int] | None = None
) -> list[dict[str, Any]]:
    """Per phase and domain drawn from: sequences and tokens drawn, the realized share of every
    global batch (``per_batch / batch``, which rounding to whole sequences may move away from
    the configured ``weight``), and, given the training blocks of each domain, tokens available
    and how many times the domain has been read by the end of the phase (``None`` without
    ``blocks``). Pure: the data module and the study's dry run print the same rows."""
    ends = [*schedule.starts[1:].tolist(), max_steps]
    batch = schedule.batch_size
    rows = []
    for i, (start, end) in enumerate(zip(schedule.starts.tolist(), ends, strict=True)):
        if start >= max_steps:
            break
        drawn = schedule.draws_between(start, end)
        total = schedule.draws_before(end)
        for d, name in enumerate(schedule.domains):
            if drawn[d] == 0:
                continue
            n_blocks = None if blocks is None else blocks[name]
            rows.append(
                {
                    "phase": i,
                    "start": start,
                    "end": end,
                    "domain": name,
                    "weight": float(schedule.weights[i, d]),
                    "per_batch": int(schedule.counts[i, d]),
                    "batch": batch,
                    "share": int(schedule.counts[i, d]) / batch,
                    "sequences": int(drawn[d]),
                    "tokens": int(drawn[d]) * seq_len,
                    "available": None if n_blocks is None else n_blocks * seq_len,
                    "epochs": None if not n_blocks else float(total[d]) / n_blocks,
                }
            )
    return rows


def share_differs(row: Mapping[str, Any]) -> bool:
    """Whether rounding to whole sequences per batch moved the share off the weight."""
    return abs(row["share"] - row["weight"]) > 1e-9


def format_plan(rows: Sequence[Mapping[str, Any]], seq_len: int, title: str | None = None) -> str:
    """The plan as a table. ``per batch`` is the exact count of sequences every global batch of
    the phase holds: the largest-remainder rounding of weight x batch; ``realized`` is that
    count as a share, shown where it differs from the weight."""
    fmt = "  {:<15} {:<14} {:>7} {:>11} {:>9} {:>16} {:>16} {:>7}"
    lines = [
        title or f"mixture plan (tokens = sequences x seq_len {seq_len}):",
        fmt.format(
            "steps", "domain", "weight", "per batch", "realized", "tokens", "available", "epochs"
        ),
    ]
    for r in rows:
        lines.append(
            fmt.format(
                f"{r['start']}-{r['end']}",
                r["domain"],
                f"{r['weight']:.3f}",
                f"{r['per_batch']}/{r['batch']}",
                f"{r['share']:.2%}" if share_differs(r) else "",
                f"{r['tokens']:,}",
                "?" if r["available"] is None else f"{r['available']:,}",
                "?" if r["epochs"] is None else f"{r['epochs']:.2f}",
            )
        )
    if any(share_differs(r) for r in rows):
        lines.append(
            "  realized: the share each global batch holds, where rounding to whole "
            "sequences moves it off the configured weight"
        )
    return "\n".join(lines)


def check_repeat(rows: Sequence[Mapping[str, Any]], max_repeat: float | None) -> None:
    """One-line error naming every domain the plan would read more than ``max_repeat`` times."""
    if max_repeat is None:
        return
    worst: dict[str, Mapping[str, Any]] = {}
    for r in rows:
        if (
            r["epochs"] is not None
            and r["epochs"] > max_repeat
            and (r["domain"] not in worst or r["epochs"] > worst[r["domain"]]["epochs"])
        ):
            worst[r["domain"]] = r
    if worst:
        over = ", ".join(
            f"domain {d!r} would be read {r['epochs']:.1f} times by step {r['end']}"
            for d, r in worst.items()
        )
        raise MidtrainError(
            f"data.max_repeat: {over} (limit {max_repeat}); add data, lower "
            f"{'its weight' if len(worst) == 1 else 'their weights'}, or raise data.max_repeat"
        )


# -- keyed permutation -------------------------------------------------------------------------


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser on uint64 arrays (wrapping arithmetic)."""
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def permute(index: np.ndarray, n: int, key: int, rounds: int = 4) -> np.ndarray:
    """A bijection of [0, n) keyed by ``key``: Feistel network plus cycle walking."""
    index = np.asarray(index, dtype=np.uint64)
    if n <= 1:
        return np.zeros_like(index)
    half = max(1, (int(n - 1).bit_length() + 1) // 2)
    mask = np.uint64((1 << half) - 1)
    keys = _mix(np.arange(rounds, dtype=np.uint64) + np.uint64(key & 0xFFFFFFFFFFFFFFFF))

    def feistel(x: np.ndarray) -> np.ndarray:
        left, right = x >> np.uint64(half), x & mask
        for k in keys:
            left, right = right, left ^ (_mix(right ^ k) & mask)
        return (left << np.uint64(half)) | right

    with np.errstate(over="ignore"):
        out = feistel(index)
        todo = out >= np.uint64(n)
        while todo.any():  # domain is < 4n, so a few walks at most
            out[todo] = feistel(out[todo])
            todo = out >= np.uint64(n)
    return out.astype(np.int64)


def domain_key(name: str) -> int:
    """A stable key per domain name, so adding a domain to a schedule (a fork) leaves the block
    order of every other domain unchanged."""
    return zlib.crc32(name.encode("utf-8"))


def _chain(*values: int) -> int:
    """Order-sensitive hash of integers: (seed 0, epoch 1) and (seed 1, epoch 0) differ."""
    h = np.zeros(1, dtype=np.uint64)
    with np.errstate(over="ignore"):
        for v in values:
            h = _mix(h ^ np.array([v & 0xFFFFFFFFFFFFFFFF], dtype=np.uint64))
    return int(h[0])


def block_indices(draws: np.ndarray, num_blocks: int, seed: int, domain_id: int) -> np.ndarray:
    """Block read by each draw number of one domain (``domain_id`` = ``domain_key(name)``):
    a fresh permutation every epoch."""
    draws = np.asarray(draws, dtype=np.int64)
    epoch, within = np.divmod(draws, num_blocks)
    out = np.empty_like(draws)
    for e in np.unique(epoch):
        sel = epoch == e
        key = _chain(seed, domain_id, int(e))
        out[sel] = permute(within[sel], num_blocks, key)
    return out
