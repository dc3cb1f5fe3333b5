"""The mixture callbacks: ``MixtureSwitch`` (a new mixture from an optimizer step on) and
``MixtureLogging`` (``mixture/weight/<domain>``). The data module owns the schedule; these
register with it and read it."""

from __future__ import annotations

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_info

from midtrain.checkpoint.layout import checkpoint_dir, switch_checkpoint
from midtrain.data.contract import require_contract, require_max_steps
from midtrain.data.mixture import check_ramp
from midtrain.errors import MidtrainError
from midtrain.train.callbacks.base import StepCallback
from midtrain.train.metrics import is_logging_step


class MixtureSwitch(StepCallback):
    """Switch the data mixture at an optimizer step.

    The first batch of optimizer step ``step`` (or ``round(fraction * max_steps)``) is drawn
    from ``weights`` — exactly, for any num_workers, prefetch_factor, gradient accumulation and
    world size, because the switch registers with the data module (``add_switch``) in ``setup``,
    before training starts, and the data module folds it into its schedule (a switch applied
    from a hook would reach the model late: the loader runs ahead).

    With ``ramp_steps`` R > 0 the mixture does not jump: optimizer step ``step + k`` (k < R)
    draws from the weights in force before the switch moved ``(k + 1) / R`` of the way to
    ``weights`` (``ramp="linear"``) or ``(1 - cos(pi (k + 1) / R)) / 2`` (``"cosine"``); every
    step's counts are the largest-remainder rounding of its own weights, and ``weights`` hold
    from step ``step + R - 1`` on. R = 0 (the default) and R = 1 are the jump.

    At the switch it logs the event and, with ``save_checkpoint``, writes
    ``switch-step=<N>.ckpt`` next to the run's checkpoints: the state right before step N, which
    ``midtrain fit --fork`` branches from. Use several callbacks for several phases (a
    multi-stage schedule); their ramps may not overlap.
    """

    def __init__(
        self,
        weights: dict[str, float],
        step: int | None = None,
        fraction: float | None = None,
        save_checkpoint: bool = True,
        ramp_steps: int = 0,
        ramp: str = "linear",
    ) -> None:
        if (step is None) == (fraction is None):
            raise MidtrainError("MixtureSwitch: give exactly one of `step` or `fraction`")
        if fraction is not None and not 0 < fraction < 1:
            raise MidtrainError(f"MixtureSwitch.fraction: must be in (0, 1), got {fraction}")
        where = f"MixtureSwitch(step={step})" if step is not None else "MixtureSwitch"
        check_ramp(ramp_steps, ramp, where)
        self.weights = dict(weights)
        self.step = step
        self.fraction = fraction
        self.save_checkpoint = save_checkpoint
        self.ramp_steps = ramp_steps
        self.ramp = ramp

    def resolve_step(self, max_steps: int) -> int:
        if self.step is not None:
            return int(self.step)
        assert self.fraction is not None  # __init__: exactly one of step, fraction
        return int(round(self.fraction * max_steps))

    def register(self, datamodule: object, max_steps: int) -> None:
        """Register this switch with the data module that owns the schedule (idempotent)."""
        if not hasattr(datamodule, "add_switch"):
            raise MidtrainError(
                f"MixtureSwitch: the data module {type(datamodule).__name__} has no mixture "
                "schedule (add_switch); use it with midtrain.MixtureDataModule"
            )
        datamodule.add_switch(
            self.resolve_step(max_steps),
            self.weights,
            max_steps,
            owner=self,
            ramp_steps=self.ramp_steps,
            ramp=self.ramp,
        )

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            max_steps = require_max_steps(trainer, "MixtureSwitch steps are optimizer steps")
            self.register(trainer.datamodule, max_steps)  # type: ignore[attr-defined]  # set by Lightning, undeclared

    def on_optimizer_step_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, step: int
    ) -> None:
        switch = self.resolve_step(trainer.max_steps)
        if step + 1 != switch:  # the switch's step runs next
            return
        ramp = f" (a {self.ramp} ramp of {self.ramp_steps} steps)" if self.ramp_steps > 1 else ""
        rank_zero_info(f"mixture switch before step {switch}: {self.weights}{ramp}")
        if self.save_checkpoint:
            # a full, resumable checkpoint (unset, Lightning says so in an info line)
            trainer.save_checkpoint(
                checkpoint_dir(trainer) / switch_checkpoint(switch), weights_only=False
            )


class MixtureLogging(StepCallback):
    """Logs ``mixture/weight/<domain>`` (the schedule's normalised weight, from the data
    module's ``weights_at``; inside a ramp, the step's interpolated weight) for every domain
    with weight in some phase, on logging steps and always on both sides of a phase start and
    a ramp end, so the curve steps exactly at the switch whatever ``log_every_n_steps`` is. A weight of 0 here is the schedule, not a stale measurement.
    The ``midtrain`` command adds it by default."""

    def on_optimizer_step_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, step: int
    ) -> None:
        dm = trainer.datamodule  # type: ignore[attr-defined]  # set by Lightning, undeclared
        if dm is None:
            return
        data = require_contract(dm)
        starts = data.phase_starts()
        every = trainer.log_every_n_steps  # type: ignore[attr-defined]  # set by Lightning, undeclared
        if not is_logging_step(step, every, trainer.max_steps, starts):
            return
        used = {d for s in starts for d, w in data.weights_at(s).items() if w > 0}
        weights = {f"mixture/weight/{d}": w for d, w in data.weights_at(step).items() if d in used}
        for logger in trainer.loggers:
            logger.log_metrics(weights, step=step)
