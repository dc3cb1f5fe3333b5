"""Callbacks users put in ``trainer.callbacks`` (or that the CLI adds by default)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback, ThroughputMonitor
from lightning.pytorch.callbacks import ModelCheckpoint as _LightningModelCheckpoint
from lightning.pytorch.utilities import rank_zero_info

from midtrain._lightning import throughput_metrics
from midtrain.data.contract import require_contract, require_max_steps
from midtrain.errors import MidtrainError
from midtrain.metrics import is_logging_step
from midtrain.paths import checkpoint_dir, step_checkpoint, switch_checkpoint


class ModelCheckpoint(_LightningModelCheckpoint):
    """Lightning's ModelCheckpoint, plus one guarantee: the final step of ``fit`` is saved.

    With ``every_n_train_steps`` set, Lightning saves nothing at the end of training unless the
    last step is a multiple of it, so a run of 250 steps saved every 100 would lose its last 50.
    """

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_end(trainer, pl_module)
        if self._should_skip_saving_checkpoint(trainer) or trainer.interrupted:
            return
        candidates = self._monitor_candidates(trainer)
        if self.monitor is None or self.monitor in candidates:
            self._save_topk_checkpoint(trainer, candidates)
        self._save_last_checkpoint(trainer, candidates)


class MixtureSwitch(Callback):
    """Switch the data mixture at an optimizer step.

    The first batch of optimizer step ``step`` (or ``round(fraction * max_steps)``) is drawn
    from ``weights`` — exactly, for any num_workers, prefetch_factor, gradient accumulation and
    world size, because the switch registers with the data module (``add_switch``) in ``setup``,
    before training starts, and the data module folds it into its schedule (a switch applied
    from a hook would reach the model late: the loader runs ahead).

    At the switch it logs the event and, with ``save_checkpoint``, writes
    ``switch-step=<N>.ckpt`` next to the run's checkpoints: the state right before step N, which
    ``midtrain fit --fork`` branches from. Use several callbacks for several phases.
    """

    def __init__(self, weights: dict[str, float], step: int | None = None,
                 fraction: float | None = None, save_checkpoint: bool = True) -> None:
        if (step is None) == (fraction is None):
            raise MidtrainError("MixtureSwitch: give exactly one of `step` or `fraction`")
        if fraction is not None and not 0 < fraction < 1:
            raise MidtrainError(f"MixtureSwitch.fraction: must be in (0, 1), got {fraction}")
        self.weights = dict(weights)
        self.step = step
        self.fraction = fraction
        self.save_checkpoint = save_checkpoint

    def resolve_step(self, max_steps: int) -> int:
        if self.step is not None:
            return int(self.step)
        return int(round(self.fraction * max_steps))  # type: ignore[operator]

    def register(self, datamodule: Any, max_steps: int) -> None:
        """Register this switch with the data module that owns the schedule (idempotent)."""
        if not hasattr(datamodule, "add_switch"):
            raise MidtrainError(
                f"MixtureSwitch: the data module {type(datamodule).__name__} has no mixture "
                "schedule (add_switch); use it with midtrain.MixtureDataModule"
            )
        datamodule.add_switch(self.resolve_step(max_steps), self.weights, max_steps, owner=self)

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            max_steps = require_max_steps(trainer, "MixtureSwitch steps are optimizer steps")
            self.register(trainer.datamodule, max_steps)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           outputs: object, batch: object, batch_idx: int) -> None:
        step = self.resolve_step(trainer.max_steps)
        stepped = (batch_idx + 1) % trainer.accumulate_grad_batches == 0
        if not stepped or trainer.global_step != step:
            return
        rank_zero_info(f"mixture switch before step {step}: {self.weights}")
        if self.save_checkpoint:
            trainer.save_checkpoint(checkpoint_dir(trainer) / switch_checkpoint(step))


class CheckpointAtSteps(Callback):
    """Save ``step=<N>.ckpt`` when optimizer step N is reached (before step N runs): fork
    points for branches, e.g. every midtraining start step of a study's shared prefix."""

    def __init__(self, steps: list[int], dirpath: str | None = None) -> None:
        self.steps = sorted(set(int(s) for s in steps))
        self.dirpath = dirpath

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           outputs: object, batch: object, batch_idx: int) -> None:
        stepped = (batch_idx + 1) % trainer.accumulate_grad_batches == 0
        if stepped and trainer.global_step in self.steps:
            directory = Path(self.dirpath) if self.dirpath else checkpoint_dir(trainer)
            trainer.save_checkpoint(directory / step_checkpoint(trainer.global_step))


class MixtureLogging(Callback):
    """Logs ``mixture/weight/<domain>`` (the schedule's normalised weight, from the data
    module's ``weights_at``) for every domain with weight in some phase, on logging steps and
    always on both sides of a phase start, so the curve steps exactly at the switch whatever
    ``log_every_n_steps`` is. A weight of 0 here is the schedule, not a stale measurement.
    The ``midtrain`` command adds it by default."""

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           outputs: object, batch: object, batch_idx: int) -> None:
        if (batch_idx + 1) % trainer.accumulate_grad_batches or trainer.datamodule is None:
            return
        data = require_contract(trainer.datamodule)
        step = trainer.global_step - 1  # the optimizer step just taken
        starts = data.phase_starts()
        if not is_logging_step(step, trainer.log_every_n_steps, trainer.max_steps, starts):
            return
        used = {d for s in starts for d, w in data.weights_at(s).items() if w > 0}
        weights = {f"mixture/weight/{d}": w for d, w in data.weights_at(step).items()
                   if d in used}
        for logger in trainer.loggers:
            logger.log_metrics(weights, step=step)


def _sequences(batch: dict) -> int:
    return int(batch["input_ids"].shape[0])


def _tokens(batch: dict) -> int:
    return int(batch["input_ids"].numel())


class Throughput(ThroughputMonitor):
    """Lightning's ThroughputMonitor set up for token batches: logs (per device and in total)
    batches, sequences ("samples") and tokens ("items") per second, and, where the device's
    peak FLOP/s is known (GPUs), FLOP/s and MFU from ``CausalLM.flops_per_batch`` (the model's
    training FLOPs per token x tokens). Tokens/s also appears in the progress bar."""

    def __init__(self, window_size: int = 20, separator: str = "/") -> None:
        super().__init__(batch_size_fn=_sequences, length_fn=_tokens, window_size=window_size,
                         separator=separator)
        self.separator = separator

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           outputs: Any, batch: Any, *args: Any) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, *args)
        if trainer.progress_bar_callback is None or not trainer.is_global_zero:
            return
        per_device = throughput_metrics(self, trainer).get(f"device{self.separator}items_per_sec")
        if per_device is not None:  # a host tensor: the progress bar never waits for the device
            pl_module.log("tokens/s", torch.tensor(float(per_device)), prog_bar=True,
                          logger=False, on_step=True, on_epoch=False, batch_size=1)
