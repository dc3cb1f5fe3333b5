"""``AdaptiveMixture``: the mixture changes itself during training, from the per-domain losses
``CausalLM`` logs, through the data module's public ``change_weights``.

Two rules, one update. Every decision gives each domain a score and moves the weights
multiplicatively, ``w_d <- w_d * exp(step_size * score_d)``, normalised, optionally smoothed
toward the initial mix, then projected into ``[floor, ceiling]`` (``bounded``):

* ``excess_loss`` (DoReMi-style): ``score_d = max(loss_d - reference_d, 0)``.
* ``thompson``: a Beta-Bernoulli bandit per domain, rewarded when the domain's loss went down
  since the previous decision; ``score_d`` is a draw from its posterior (``random.Random``
  seeded by ``seed``, its state kept in checkpoints).

The data module owns the schedule: a decision is a runtime phase in its checkpoint state, so a
resumed run replays it; this callback keeps only its own algorithm state.
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import yaml

from midtrain.configs import load_yaml
from midtrain.data.contract import require_max_steps
from midtrain.data.datamodule import MAX_PHASES
from midtrain.errors import MidtrainError
from midtrain.run_state import RunPlan, Setting, plan_of
from midtrain.train.callbacks.base import StepCallback

RULES = ("excess_loss", "thompson")
WHERE = "AdaptiveMixture"


def bounded(weights: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """The weights scaled by one factor s and clipped into ``[lo, hi]``, with s chosen so that
    they sum to 1: ``clip(s * w, lo, hi)``. Proportions among unclipped domains are kept.
    Needs ``sum(lo) <= 1 <= sum(hi)`` (checked when the callback is set up); a zero weight
    counts as a tiny one, so it can still be lifted when every other domain is at its
    ceiling."""
    w = np.maximum(np.asarray(weights, dtype=np.float64), 1e-12)
    lo, hi = np.asarray(lo, dtype=np.float64), np.asarray(hi, dtype=np.float64)

    def total(s: float) -> float:
        return float(np.clip(s * w, lo, hi).sum())

    # sum(clip(s w)) is piecewise linear and non-decreasing in s: find the piece holding 1
    points = np.unique(np.concatenate([lo / w, hi / w, [0.0]]))
    sums = np.array([total(s) for s in points])
    i = int(np.searchsorted(sums, 1.0))
    if i >= len(points):
        return np.clip(points[-1] * w, lo, hi) / sums[-1]
    s = points[i] if i == 0 or sums[i] == sums[i - 1] else None
    if s is None:  # linear between the two breakpoints
        a, b = points[i - 1], points[i]
        s = a + (1.0 - sums[i - 1]) * (b - a) / (sums[i] - sums[i - 1])
    out = np.clip(s * w, lo, hi)
    free = (out > lo) & (out < hi)
    if free.any():  # exact normalisation: the rounding goes to the unclipped domains
        rest = 1.0 - out[~free].sum()
        out[free] = w[free] / w[free].sum() * rest
    return out


def multiplicative_update(
    weights: np.ndarray,
    scores: np.ndarray,
    step_size: float,
    initial: np.ndarray,
    smoothing: float,
    lo: np.ndarray,
    hi: np.ndarray,
) -> np.ndarray:
    """``w * exp(step_size * score)`` normalised, mixed ``smoothing`` of the way toward
    ``initial``, then ``bounded``. Pure: the same inputs give the same bits."""
    w = np.asarray(weights, dtype=np.float64)
    logits = np.where(w > 0, np.log(np.maximum(w, 1e-300)) + step_size * scores, -np.inf)
    new = np.exp(logits - logits.max())
    new /= new.sum()
    new = (1.0 - smoothing) * new + smoothing * initial
    return bounded(new, lo, hi)


def _number(value: Any, key: str, low: float, high: float) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not ok or not math.isfinite(value) or not low <= value <= high:
        raise MidtrainError(f"{WHERE}.{key}: must be a number in [{low}, {high}], got {value!r}")
    return float(value)


def _whole(value: Any, key: str, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise MidtrainError(f"{WHERE}.{key}: must be a whole number >= {low}, got {value!r}")
    return value


def _per_domain(value: Any, key: str) -> float | dict[str, float]:
    """A bound: one number for every domain, or domain -> number (others: the default)."""
    if isinstance(value, Mapping):
        return {str(d): _number(v, f"{key}.{d}", 0.0, 1.0) for d, v in value.items()}
    return _number(value, key, 0.0, 1.0)


def read_reference(reference: Any) -> dict[str, float]:
    """Reference losses: a mapping domain -> loss, or the path of a JSON/YAML file holding one,
    or a reference run's ``summary.json`` (its ``metrics``' ``train/loss/<domain>``), or that
    run's directory (its ``summary.json``)."""
    table: Any = reference
    if not isinstance(reference, Mapping):
        path = Path(str(reference))
        if path.is_dir():
            path = path / "summary.json"
        try:
            text = path.read_text()
            table = json.loads(text) if path.suffix == ".json" else load_yaml(text, str(path))
        except (OSError, ValueError, yaml.YAMLError) as e:
            raise MidtrainError(
                f"{WHERE}.reference: cannot read {path} ({type(e).__name__}); give a JSON/YAML "
                "mapping domain -> loss or a reference run's summary.json"
            ) from None
        if isinstance(table, Mapping) and isinstance(table.get("metrics"), Mapping):
            table = table["metrics"]
        if not isinstance(table, Mapping):
            raise MidtrainError(f"{WHERE}.reference: {path} is not a mapping domain -> loss")
    out = {}
    for key, value in table.items():
        name = str(key).removeprefix("train/loss/")
        if "/" in name:  # other metrics of a summary.json
            continue
        out[name] = _number(value, f"reference.{name}", 0.0, math.inf)
    return out


class AdaptiveMixture(StepCallback):
    """Change the data mixture during training from the per-domain training losses.

    Decisions are taken before optimizer step G runs, for every G that is a multiple of
    ``every_n_steps`` with ``start_step < G < max_steps - 1``, from the losses logged at step
    G - 1 (a logging step: ``every_n_steps`` must be a multiple of ``trainer.log_every_n_steps``).
    Each decision is one ``datamodule.change_weights`` call: it applies from the step that
    returns (G + 1 without loader workers; later with workers, by what they may have produced).
    Only domains measured since the previous decision (``train/tokens/<domain>`` moved) score.

    Args:
        rule: ``excess_loss`` (needs ``reference``) or ``thompson``.
        every_n_steps: optimizer steps between decisions.
        start_step: no decision reads a step before this one.
        step_size: eta of the multiplicative update.
        floor, ceiling: bounds on every weight (a number, or domain -> number; unlisted
            domains get 0 and 1). Needs sum(floors) <= 1 <= sum(ceilings).
        reference: ``excess_loss``'s reference loss per domain: a mapping, a JSON/YAML file
            holding one, or a reference run's ``summary.json`` (or its directory).
        smoothing: after each update, mix this share of the initial weights back in.
        seed: seeds the ``thompson`` draws.

    The domains adapted are those with weight at ``start_step``, plus any given a floor > 0 by
    name (``floor: {code: 0.05}``).
    """

    def __init__(
        self,
        rule: str,
        every_n_steps: int = 100,
        start_step: int = 0,
        step_size: float = 1.0,
        floor: float | dict[str, float] = 0.0,
        ceiling: float | dict[str, float] = 1.0,
        reference: dict[str, float] | str | None = None,
        smoothing: float = 0.0,
        seed: int = 0,
    ) -> None:
        if rule not in RULES:
            raise MidtrainError(f"{WHERE}.rule: must be one of {', '.join(RULES)}, got {rule!r}")
        self.rule = rule
        self.every_n_steps = _whole(every_n_steps, "every_n_steps", 1)
        self.start_step = _whole(start_step, "start_step", 0)
        self.step_size = _number(step_size, "step_size", 0.0, math.inf)
        if self.step_size <= 0:
            raise MidtrainError(f"{WHERE}.step_size: must be > 0, got {step_size!r}")
        self.floor = _per_domain(floor, "floor")
        self.ceiling = _per_domain(ceiling, "ceiling")
        scalars = isinstance(self.floor, float) and isinstance(self.ceiling, float)
        if scalars and self.floor > self.ceiling:  # type: ignore[operator]
            raise MidtrainError(f"{WHERE}.floor: {self.floor} is above ceiling {self.ceiling}")
        if rule == "excess_loss" and reference is None:
            raise MidtrainError(
                f"{WHERE}.reference: rule excess_loss needs reference losses per domain "
                "(a mapping domain -> loss, or a reference run's summary.json)"
            )
        self.reference = read_reference(reference) if reference is not None else None
        self.smoothing = _number(smoothing, "smoothing", 0.0, 1.0)
        if self.smoothing >= 1:
            raise MidtrainError(f"{WHERE}.smoothing: must be below 1, got {smoothing!r}")
        self.seed = _whole(seed, "seed", 0)
        self.domains: list[str] = []  # the adapted domains, fixed at the start of training
        self.history: list[dict[str, Any]] = []  # {"step", "effective", "weights"} per decision
        self.rng = random.Random(self.seed)
        self.alpha: dict[str, float] = {}
        self.beta: dict[str, float] = {}
        self.seen: dict[str, list[float]] = {}  # domain -> [tokens, loss] at the last decision
        self.initial: dict[str, float] = {}
        self._loaded: dict[str, Any] | None = None

    def config(self) -> dict[str, Any]:
        """The settings a resume must agree with."""
        return {
            "rule": self.rule,
            "every_n_steps": self.every_n_steps,
            "start_step": self.start_step,
            "step_size": self.step_size,
            "floor": self.floor,
            "ceiling": self.ceiling,
            "reference": self.reference,
            "smoothing": self.smoothing,
            "seed": self.seed,
        }

    # -- run state (midtrain.checkpoint.plan) -----------------------------------------------
    def run_settings(self, trainer: pl.Trainer) -> dict[str, Setting]:
        """Every setting (``config``): a resume keeps them; a fork with other settings adapts
        afresh from its fork step."""
        return {f"{WHERE}.{k}": Setting(v) for k, v in self.config().items()}

    def check_plan(self, plan: RunPlan, trainer: pl.Trainer) -> None:
        if plan.command == "fit":
            self.check(trainer, trainer.datamodule)  # type: ignore[attr-defined]  # set by Lightning, undeclared

    # -- checks ---------------------------------------------------------------------------
    def _bound(self, bound: float | dict[str, float], name: str, default: float) -> float:
        return bound if isinstance(bound, float) else bound.get(name, default)

    def adapted_domains(self, datamodule: Any) -> list[str]:
        """Domains with weight at ``start_step``, and those given a floor > 0 by name (a
        floor for every domain does not bring in a domain the mixture does not draw)."""
        start = datamodule.weights_at(self.start_step)
        named = self.floor if isinstance(self.floor, dict) else {}
        return [d for d in datamodule.domains if start.get(d, 0.0) > 0 or named.get(d, 0.0) > 0]

    def check(self, trainer: pl.Trainer, datamodule: Any) -> None:
        """One-line errors for settings this run cannot honour (``check_plan``: before
        anything is written, and again in ``setup``)."""
        if not hasattr(datamodule, "change_weights"):
            raise MidtrainError(
                f"{WHERE}: the data module {type(datamodule).__name__} has no runtime mixture "
                "(change_weights); use it with midtrain.MixtureDataModule"
            )
        callbacks = trainer.callbacks  # type: ignore[attr-defined]  # set by Lightning, undeclared
        if sum(isinstance(c, AdaptiveMixture) for c in callbacks) > 1:
            raise MidtrainError(f"{WHERE}: give at most one AdaptiveMixture callback")
        max_steps = require_max_steps(trainer, "AdaptiveMixture steps are optimizer steps")
        log_every = trainer.log_every_n_steps  # type: ignore[attr-defined]  # set by Lightning, undeclared
        if log_every < 1 or self.every_n_steps % log_every:
            raise MidtrainError(
                f"{WHERE}.every_n_steps: {self.every_n_steps} is not a multiple of "
                f"trainer.log_every_n_steps={log_every}; decisions read the per-domain losses "
                "of logging steps"
            )
        if self.start_step >= max_steps:
            raise MidtrainError(
                f"{WHERE}.start_step: {self.start_step} is not before trainer.max_steps={max_steps}"
            )
        known = list(datamodule.domains)
        tables = [("floor", self.floor), ("ceiling", self.ceiling)]
        for key, table in [*tables, ("reference", self.reference)]:
            for name in table if isinstance(table, dict) else ():
                if name not in known:
                    raise MidtrainError(
                        f"{WHERE}.{key}: unknown domain {name!r}; known: {', '.join(known)}"
                    )
        self._check_bounds(self.adapted_domains(datamodule))
        decisions = len(self.decision_steps(max_steps))
        room = MAX_PHASES - len(datamodule.phases)
        if decisions > room:
            raise MidtrainError(
                f"{WHERE}.every_n_steps: {decisions} decisions would exceed the data module's "
                f"{room} free mixture phases; raise every_n_steps to at least "
                f"{-(-max_steps // room)}"
            )

    def _check_bounds(self, domains: list[str]) -> None:
        lo = [self._bound(self.floor, d, 0.0) for d in domains]
        hi = [self._bound(self.ceiling, d, 1.0) for d in domains]
        for d, a, b in zip(domains, lo, hi, strict=True):
            if a > b:
                raise MidtrainError(f"{WHERE}.floor.{d}: {a} is above its ceiling {b}")
        if sum(lo) > 1 + 1e-9:
            raise MidtrainError(
                f"{WHERE}.floor: the floors of {', '.join(domains)} sum to {sum(lo):g} > 1"
            )
        if sum(hi) < 1 - 1e-9:
            raise MidtrainError(
                f"{WHERE}.ceiling: the ceilings of {', '.join(domains)} sum to {sum(hi):g} < 1"
            )
        missing = [d for d in domains if self.reference is not None and d not in self.reference]
        if self.rule == "excess_loss" and missing:
            raise MidtrainError(
                f"{WHERE}.reference: no reference loss for domain {missing[0]!r} "
                f"(adapted: {', '.join(domains)})"
            )

    def decision_steps(self, max_steps: int) -> list[int]:
        """The steps G before which a decision is taken (from the losses of step G - 1)."""
        first = (self.start_step // self.every_n_steps + 1) * self.every_n_steps
        return list(range(first, max_steps - 1, self.every_n_steps))

    # -- Lightning hooks ------------------------------------------------------------------
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            self.check(trainer, trainer.datamodule)  # type: ignore[attr-defined]  # set by Lightning, undeclared

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # after a checkpoint is restored and every switch registered: the schedule is whole
        datamodule = trainer.datamodule  # type: ignore[attr-defined]  # set by Lightning, undeclared
        self._restore(trainer)
        if self.domains:
            return
        self.domains = self.adapted_domains(datamodule)
        self._check_bounds(self.domains)
        start = datamodule.weights_at(self.start_step)
        lo, hi = self._bounds()
        first = bounded(np.array([start.get(d, 0.0) for d in self.domains]), lo, hi)
        self.initial = dict(zip(self.domains, first.tolist(), strict=True))
        self.alpha = dict.fromkeys(self.domains, 1.0)
        self.beta = dict.fromkeys(self.domains, 1.0)

    def on_optimizer_step_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, step: int
    ) -> None:
        # decisions come before an optimizer step's first micro-batch
        due = step % self.every_n_steps == 0 and self.start_step < step < trainer.max_steps - 1
        if due and not (self.history and self.history[-1]["step"] == step):
            self.decide(trainer, step)

    def _bounds(self) -> tuple[np.ndarray, np.ndarray]:
        lo = np.array([self._bound(self.floor, d, 0.0) for d in self.domains])
        hi = np.array([self._bound(self.ceiling, d, 1.0) for d in self.domains])
        return lo, hi

    # -- deciding -------------------------------------------------------------------------
    def measured(self, metrics: Mapping[str, Any]) -> dict[str, float]:
        """The losses of domains measured since the previous decision: their cumulative
        ``train/tokens/<domain>`` moved (a loss logged earlier is not measured twice)."""
        out = {}
        for d in self.domains:
            tokens, loss = metrics.get(f"train/tokens/{d}"), metrics.get(f"train/loss/{d}")
            if tokens is None or loss is None:
                continue
            if d not in self.seen or self.seen[d][0] != float(tokens):
                out[d] = float(loss)
        return out

    def scores(self, losses: Mapping[str, float]) -> np.ndarray:
        """Each adapted domain's score for this decision (0 for a domain not measured)."""
        if self.rule == "excess_loss":
            ref = self.reference or {}
            return np.array([max(losses[d] - ref[d], 0.0) if d in losses else 0.0
                             for d in self.domains])  # fmt: skip
        for d, loss in losses.items():  # the bandit's reward: the loss went down
            if d in self.seen:
                if loss < self.seen[d][1]:
                    self.alpha[d] += 1.0
                else:
                    self.beta[d] += 1.0
        return np.array([self.rng.betavariate(self.alpha[d], self.beta[d]) for d in self.domains])

    def decide(self, trainer: pl.Trainer, step: int) -> int:
        """One decision before optimizer step ``step``; returns the step it applies from."""
        datamodule = trainer.datamodule  # type: ignore[attr-defined]  # set by Lightning, undeclared
        metrics = trainer.callback_metrics
        losses = self.measured(metrics)
        scores = self.scores(losses)
        last = self.history[-1]["effective"] if self.history else step
        now = datamodule.weights_at(last)
        current = np.array([now.get(d, 0.0) for d in self.domains])
        initial = np.array([self.initial[d] for d in self.domains])
        if current.sum() <= 0:  # a switch moved every weight elsewhere: start from the first mix
            current = initial
        new = multiplicative_update(
            current / current.sum(), scores, self.step_size, initial, self.smoothing,
            *self._bounds(),
        )  # fmt: skip
        weights = dict(zip(self.domains, new.tolist(), strict=True))
        effective = datamodule.change_weights(weights)
        self.history.append({"step": step, "effective": effective, "weights": weights})
        for d, loss in losses.items():
            self.seen[d] = [float(metrics[f"train/tokens/{d}"]), loss]
        return effective

    # -- checkpoint state ------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        version, internal, gauss = self.rng.getstate()
        return {
            "config": self.config(),
            "domains": list(self.domains),
            "initial": dict(self.initial),
            "alpha": dict(self.alpha),
            "beta": dict(self.beta),
            "seen": {d: list(v) for d, v in self.seen.items()},
            "history": [dict(h) for h in self.history],
            "rng": [version, list(internal), gauss],
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # applied in on_train_start, where the trainer says whether this is a fork
        self._loaded = dict(state_dict)

    def continues(self, state: Mapping[str, Any] | None) -> bool:
        """Whether this callback continues a checkpoint's ``state``: the same settings (a
        resume with others was refused by the planner; a fork with others adapts afresh)."""
        if state is None:
            return False
        return state.get("config", {}) == self.config()

    def _restore(self, trainer: pl.Trainer) -> None:
        state, self._loaded = self._loaded, None
        plan = plan_of(trainer)
        if state is None or plan.mode not in ("resume", "fork") or not self.continues(state):
            return
        self.domains = list(state["domains"])
        self.initial = dict(state["initial"])
        self.alpha, self.beta = dict(state["alpha"]), dict(state["beta"])
        self.seen = {d: list(v) for d, v in state["seen"].items()}
        self.history = [dict(h) for h in state["history"]]
        version, internal, gauss = state["rng"]
        self.rng.setstate((version, tuple(internal), gauss))
        if plan.fork is not None:  # a fork drops runtime changes from its fork step on
            self.history = [h for h in self.history if h["effective"] < plan.fork.step]
