"""``StepCallback``: a callback told once per optimizer step, whatever the gradient accumulation.

Lightning calls ``on_train_batch_start``/``on_train_batch_end`` per micro-batch; midtrain's
schedules, checkpoints and decisions are per optimizer step. ``optimizer_step_ended`` is the one
place that says whether a micro-batch ended one; the callbacks, ``CausalLM`` and
``DownstreamEval`` all ask it."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback


def optimizer_step_ended(trainer: pl.Trainer, batch_idx: int) -> bool:
    """Whether micro-batch ``batch_idx`` was the last of an optimizer step (the step has been
    taken: ``trainer.global_step`` counts it)."""
    return (batch_idx + 1) % trainer.accumulate_grad_batches == 0


def optimizer_step_starts(trainer: pl.Trainer, batch_idx: int) -> bool:
    """Whether micro-batch ``batch_idx`` is the first of an optimizer step (not yet taken)."""
    return batch_idx % trainer.accumulate_grad_batches == 0


class StepCallback(Callback):
    """A callback with per-optimizer-step events (subclasses override any):

    - ``on_optimizer_step_start(trainer, pl_module, step)``: before the first micro-batch of
      optimizer step ``step`` (``trainer.global_step == step``);
    - ``on_micro_batch_end(trainer, pl_module, outputs, batch, ended)``: after every
      micro-batch, ``ended`` when it was the last of its optimizer step;
    - ``on_optimizer_step_end(trainer, pl_module, step)``: after optimizer step ``step`` was
      taken (``trainer.global_step == step + 1``), before the model logs it."""

    def on_optimizer_step_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, step: int
    ) -> None:
        return None

    def on_optimizer_step_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, step: int
    ) -> None:
        return None

    def on_micro_batch_end(
        self, trainer: pl.Trainer, pl_module: Any, outputs: Any, batch: Any, ended: bool
    ) -> None:
        return None

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if optimizer_step_starts(trainer, batch_idx):
            self.on_optimizer_step_start(trainer, pl_module, trainer.global_step)

    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        ended = optimizer_step_ended(trainer, batch_idx)
        self.on_micro_batch_end(trainer, pl_module, outputs, batch, ended)
        if ended:
            self.on_optimizer_step_end(trainer, pl_module, trainer.global_step - 1)
