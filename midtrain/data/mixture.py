"""The mixture: a pure function from (optimizer step, slot in the global batch) to
(domain, block). No state, no I/O: resuming at step N costs the same as starting at 0.

* A schedule is a list of phases, each a start optimizer step and weights over domains, and
  optionally a ramp: over its first ``ramp_steps`` steps the weights move from those in force
  before the phase to its own (``linear`` or ``cosine``; ``WeightPath``).
* Every global batch holds exactly ``counts[d]`` sequences of domain d: the largest-remainder
  rounding of that step's ``weight[d] * batch_size`` (ties broken by a seeded order), the same
  in every batch of a phase outside its ramp, never drifting with the step. With small batches the
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

RAMPS = ("linear", "cosine")
RAMP_CODES = {"linear": 0, "cosine": 1}  # a ramp as a number, for the loader workers' table


@dataclass(frozen=True)
class Phase:
    """From optimizer step ``start_step`` on, draw domains with these (unnormalised) weights;
    with ``ramp_steps`` R > 0, step ``start_step + k`` (k < R) draws from the weights in force
    before the phase moved a fraction ``ramp_fraction(k, R, ramp)`` of the way to these."""

    start_step: int
    weights: Mapping[str, float]
    ramp_steps: int = 0
    ramp: str = "linear"

    def key(self) -> tuple:
        """What a checkpoint records of the phase (a jump keeps the two-field form that
        checkpoints written before ramps existed hold)."""
        weights = dict(sorted(self.weights.items()))
        if self.ramp_steps == 0:
            return (self.start_step, weights)
        return (self.start_step, weights, self.ramp_steps, self.ramp)

    @classmethod
    def from_key(cls, key: Sequence[Any]) -> Phase:
        return cls(int(key[0]), dict(key[1]), *(key[2:4] if len(key) > 2 else ()))


def describe_schedule(keys: Sequence[Sequence[Any]]) -> str:
    """Recorded phases (``Phase.key`` form) as a person reads them: each phase's start step,
    ramp and domain shares (weights may be token counts: they are shown normalised)."""
    described = []
    for key in keys:
        phase = Phase.from_key(key)
        total = sum(phase.weights.values()) or 1.0
        shares = ", ".join(f"{d} {w / total:.3g}" for d, w in sorted(phase.weights.items()))
        ramp = f" (ramp {phase.ramp_steps} steps, {phase.ramp})" if phase.ramp_steps else ""
        described.append(f"step {phase.start_step}{ramp}: {shares}")
    return " then ".join(described) or "none"


def shift_phases(phases: Sequence[Phase], origin: int) -> list[Phase]:
    """The schedule of a stream whose step 0 is optimizer step ``origin`` (``--fork_data
    fresh``): the phase in force at ``origin`` from 0, later phases ``origin`` steps earlier.
    A ramp still running at ``origin`` has no start in the new stream: one line."""
    if origin == 0:
        return list(phases)
    phases = sorted(phases, key=lambda p: p.start_step)
    current = [p for p in phases if p.start_step <= origin][-1]
    if origin < current.start_step + current.ramp_steps:
        raise MidtrainError(
            f"fork_data: fresh starts a new stream at the fork step {origin}, but the mixture "
            f"ramps across it (the phase at step {current.start_step} ramps "
            f"{current.ramp_steps} steps); end the ramp by the fork step, start it after, or "
            "fork with --fork_data keep"
        )
    later = [
        Phase(p.start_step - origin, p.weights, p.ramp_steps, p.ramp)
        for p in phases
        if p.start_step > origin
    ]
    return [Phase(0, current.weights), *later]


def check_ramp(ramp_steps: Any, ramp: Any, where: str) -> None:
    """One-line errors for a ramp that cannot be scheduled."""
    if isinstance(ramp_steps, bool) or not isinstance(ramp_steps, int) or ramp_steps < 0:
        raise MidtrainError(
            f"{where}.ramp_steps: must be a whole number of optimizer steps >= 0, "
            f"got {ramp_steps!r}"
        )
    if ramp not in RAMPS:
        raise MidtrainError(f"{where}.ramp: must be one of {', '.join(RAMPS)}, got {ramp!r}")


def ramp_fraction(k: int, ramp_steps: int, ramp: str) -> float:
    """How far step k of a ramp of ``ramp_steps`` steps has moved (1.0 at its last step, so a
    ramp of 1 step is the jump)."""
    t = (k + 1) / ramp_steps
    if ramp == "cosine":
        return float((1.0 - np.cos(np.pi * t)) / 2.0)
    return t


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


class WeightPath:
    """The normalised weights of every optimizer step of a list of phases: the pure part of a
    schedule, without a batch size. A phase that starts inside an earlier ramp cuts it short
    (from the weights in force at that step); configured switches are refused when they
    overlap (``MixtureDataModule.add_switch``), runtime changes may cut a ramp."""

    def __init__(self, domains: Sequence[str], phases: Sequence[Phase]) -> None:
        self.domains = list(domains)
        phases = sorted(phases, key=lambda p: p.start_step)
        if not phases or phases[0].start_step != 0:
            raise MidtrainError("mixture schedule: the first phase must start at step 0")
        if phases[0].ramp_steps:
            raise MidtrainError("mixture schedule: the phase at step 0 cannot ramp (from what?)")
        for a, b in zip(phases, phases[1:], strict=False):
            if a.start_step == b.start_step:
                raise MidtrainError(f"mixture schedule: two phases start at step {a.start_step}")
        self.phases = phases
        self.starts = np.array([p.start_step for p in phases], dtype=np.int64)
        self.weights = np.zeros((len(phases), len(self.domains)))
        for i, p in enumerate(phases):
            check_weights(p.weights, self.domains, f"mixture phase at step {p.start_step}")
            check_ramp(p.ramp_steps, p.ramp, f"mixture phase at step {p.start_step}")
            for name, w in p.weights.items():
                self.weights[i, self.domains.index(name)] = w
            self.weights[i] /= self.weights[i].sum()
        # ramp steps each phase runs (a later phase may cut a ramp short), and where it starts
        lengths = [*np.diff(self.starts).tolist(), None]
        self.ramps = [
            p.ramp_steps if n is None else min(p.ramp_steps, n)
            for p, n in zip(phases, lengths, strict=True)
        ]
        self.froms = self.weights.copy()
        for i in range(1, len(phases)):
            self.froms[i] = self.weights_row(int(self.starts[i]) - 1)

    def phase_index(self, step: int) -> int:
        return int(np.searchsorted(self.starts, step, side="right")) - 1

    def weights_at(self, step: int) -> dict[str, float]:
        """Normalised weight of every domain at optimizer step ``step``."""
        return dict(zip(self.domains, self.weights_row(step).tolist(), strict=True))

    def weights_row(self, step: int) -> np.ndarray:
        """Normalised weights of optimizer step ``step``, in domain order."""
        p = self.phase_index(step)
        k = step - int(self.starts[p])
        if k >= self.ramps[p]:
            return self.weights[p]
        f = ramp_fraction(k, self.phases[p].ramp_steps, self.phases[p].ramp)
        return (1.0 - f) * self.froms[p] + f * self.weights[p]  # exactly the target at f = 1

    def boundaries(self) -> list[int]:
        """Steps where the weights change course: phase starts and the last step of every
        ramp that runs to its end (where the target weights are first in force)."""
        ends = [
            int(s) + p.ramp_steps - 1
            for s, p, r in zip(self.starts, self.phases, self.ramps, strict=True)
            if r == p.ramp_steps > 1
        ]
        return sorted({*self.starts.tolist(), *ends})


class MixtureSchedule(WeightPath):
    """Per-step domain counts and slot assignment for a list of phases.

    ``domains`` fixes the domain ids (their order); ``batch_size`` is the global batch in
    sequences per optimizer step (micro batch x accumulation x data-parallel size). Outside
    ramps a phase's counts are one row (``counts``); a ramp's steps each have their own,
    computed once here (``_ramp_counts``), with their running sums for ``draws_before``.
    """

    def __init__(
        self, domains: Sequence[str], phases: Sequence[Phase], batch_size: int, seed: int = 0
    ) -> None:
        if batch_size <= 0:
            raise MidtrainError(f"global batch size must be positive, got {batch_size}")
        super().__init__(domains, phases)
        self.batch_size = batch_size
        self.seed = seed
        self.counts = np.stack(
            [largest_remainder(w, batch_size, seed + i) for i, w in enumerate(self.weights)]
        )
        self._ramp_counts = [
            ramp_counts(self, i, batch_size, seed + i) for i in range(len(self.phases))
        ]
        zero = np.zeros((1, len(self.domains)), dtype=np.int64)
        self._ramp_cum = [np.concatenate([zero, np.cumsum(c, axis=0)]) for c in self._ramp_counts]
        # draws of each domain before each phase starts: cumulative counts in closed form
        self._before = np.zeros_like(self.counts)
        for i, length in enumerate(np.diff(self.starts).tolist()):
            self._before[i + 1] = self._before[i] + self._within(i, length)

    def _within(self, p: int, k: int) -> np.ndarray:
        """Draws of each domain in the first k steps of phase p."""
        r = self.ramps[p]
        if k <= r:
            return self._ramp_cum[p][k]
        return self._ramp_cum[p][r] + self.counts[p] * (k - r)

    def counts_at(self, step: int) -> np.ndarray:
        """Sequences of each domain in the global batch of optimizer step ``step``."""
        p = self.phase_index(step)
        k = step - int(self.starts[p])
        return self._ramp_counts[p][k] if k < self.ramps[p] else self.counts[p]

    def draws_before(self, step: int) -> np.ndarray:
        """Sequences drawn from each domain in steps [0, step)."""
        p = self.phase_index(step)
        return self._before[p] + self._within(p, step - int(self.starts[p]))

    def draws_between(self, start: int, stop: int) -> np.ndarray:
        return self.draws_before(stop) - self.draws_before(start)

    def step(self, step: int) -> tuple[np.ndarray, np.ndarray]:
        """(domain id, draw number within that domain) for every slot of optimizer step."""
        return _step_draws(self, step)


def ramp_counts(path: WeightPath, phase: int, batch_size: int, seed: int) -> np.ndarray:
    """(ramp steps, domains): the largest-remainder rounding of each ramp step's weights."""
    start = int(path.starts[phase])
    rows = [
        largest_remainder(path.weights_row(start + k), batch_size, seed)
        for k in range(path.ramps[phase])
    ]
    return np.array(rows, dtype=np.int64).reshape(len(rows), len(path.domains))


@lru_cache(maxsize=4)  # the micro-batches of one step share its draws
def _step_draws(sched: MixtureSchedule, step: int) -> tuple[np.ndarray, np.ndarray]:
    counts = sched.counts_at(step)
    rng = np.random.Generator(np.random.Philox(key=(sched.seed << 64) | step))
    domain = rng.permutation(np.repeat(np.arange(len(counts)), counts))
    # within-domain rank of each slot, in slot order
    order = np.argsort(domain, kind="stable")
    first = np.concatenate([[0], np.cumsum(counts)[:-1]])
    rank = np.empty_like(order)
    rank[order] = np.arange(len(order)) - first[domain[order]]
    return domain, sched.draws_before(step)[domain] + rank


# -- the plan: what a schedule will read ------------------------------------------------------


def plan_segments(schedule: MixtureSchedule, max_steps: int) -> list[tuple[int, int, int, bool]]:
    """(phase, start, end, is_ramp) of every stretch of steps before ``max_steps`` with one
    kind of batch: a ramp, or a phase's steady counts."""
    ends = [*schedule.starts[1:].tolist(), max_steps]
    out = []
    for i, (start, end) in enumerate(zip(schedule.starts.tolist(), ends, strict=True)):
        end = min(end, max_steps)
        ramp_end = min(start + schedule.ramps[i], end)
        if start < ramp_end:
            out.append((i, start, ramp_end, True))
        if ramp_end < end:
            out.append((i, ramp_end, end, False))
    return out


def plan_rows(
    schedule: MixtureSchedule,
    max_steps: int,
    seq_len: int,
    blocks: Mapping[str, int] | None = None,
    start_items: Mapping[str, int] | None = None,
) -> list[dict[str, Any]]:
    """Per stretch of steps (a phase, or the ramp that opens it and the steady rest) and domain
    drawn from: sequences and tokens drawn, the realized share of every global batch
    (``per_batch / batch``, which rounding to whole sequences may move away from the configured
    ``weight``; over a ramp, that of its last step, and ``weight_from``/``per_batch_from`` those of
    its first), and, given the training blocks of each domain, tokens available and how many
    times the domain has been read by the end of the stretch (``None`` without ``blocks``); a
    sequential domain starting at item ``start_items[d]`` counts from there (where in its files the
    stretch ends, in passes). Pure: the data module and the study's dry run print the same rows."""
    rows = []
    for i, start, end, is_ramp in plan_segments(schedule, max_steps):
        drawn = schedule.draws_between(start, end)
        total = schedule.draws_before(end)
        first, last = schedule.counts_at(start), schedule.counts_at(end - 1)
        w_first, w_last = schedule.weights_row(start), schedule.weights_row(end - 1)
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
                    "ramp": schedule.phases[i].ramp if is_ramp else None,
                    "weight_from": float(w_first[d]),
                    "weight": float(w_last[d]),
                    "per_batch_from": int(first[d]),
                    "per_batch": int(last[d]),
                    "batch": schedule.batch_size,
                    "share": int(last[d]) / schedule.batch_size,
                    "sequences": int(drawn[d]),
                    "tokens": int(drawn[d]) * seq_len,
                    "available": None if n_blocks is None else n_blocks * seq_len,
                    "epochs": None
                    if not n_blocks
                    else float(total[d] + (start_items or {}).get(name, 0)) / n_blocks,
                }
            )
    return rows


def share_differs(row: Mapping[str, Any]) -> bool:
    """Whether rounding to whole sequences per batch moved the share off the weight."""
    return abs(row["share"] - row["weight"]) > 1e-9


def _plan_cells(r: Mapping[str, Any]) -> list[str]:
    weight, per_batch = f"{r['weight']:.3f}", f"{r['per_batch']}/{r['batch']}"
    if r.get("ramp"):  # a ramp: first step -> last step
        weight = f"{r['weight_from']:.3f}>{weight}"
        per_batch = f"{r['per_batch_from']}>{per_batch}"
    return [
        f"{r['start']}-{r['end']}" + (f" {r['ramp']}" if r.get("ramp") else ""),
        r["domain"],
        weight,
        per_batch,
        f"{r['share']:.2%}" if share_differs(r) else "",
        f"{r['tokens']:,}",
        "?" if r["available"] is None else f"{r['available']:,}",
        "?" if r["epochs"] is None else f"{r['epochs']:.2f}",
    ]


def format_plan(rows: Sequence[Mapping[str, Any]], seq_len: int, title: str | None = None) -> str:
    """The plan as a table. ``per batch`` is the exact count of sequences every global batch of
    the stretch holds: the largest-remainder rounding of weight x batch; ``realized`` is that
    count as a share, shown where it differs from the weight. A ramp's row shows its first and
    last step (``a>b``) and the tokens drawn over the whole ramp."""
    ramps = any(r.get("ramp") for r in rows)
    fmt = "  {:<15} {:<14} {:>7} {:>11} {:>9} {:>16} {:>16} {:>7}"
    if ramps:
        fmt = "  {:<18} {:<14} {:>13} {:>11} {:>9} {:>16} {:>16} {:>7}"
    lines = [
        title or f"mixture plan (tokens = sequences x seq_len {seq_len}):",
        fmt.format(
            "steps", "domain", "weight", "per batch", "realized", "tokens", "available", "epochs"
        ),
    ]
    lines += [fmt.format(*_plan_cells(r)) for r in rows]
    if any(share_differs(r) for r in rows):
        lines.append(
            "  realized: the share each global batch holds, where rounding to whole "
            "sequences moves it off the configured weight"
        )
    if ramps:
        lines.append(
            "  a>b: a ramp's first and last step; each step holds the rounding of its own weights"
        )
    return "\n".join(lines)


def check_repeat(rows: Sequence[Mapping[str, Any]], max_repeat: float | None) -> None:
    """One-line error naming every domain the plan would read more than ``max_repeat`` times
    (by the end of any stretch, ramps included)."""
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
