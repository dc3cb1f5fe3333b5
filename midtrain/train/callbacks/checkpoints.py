"""Checkpoint callbacks: midtrain's ``ModelCheckpoint`` (also saves after the final step) and
``CheckpointAtSteps`` (fork points)."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
from lightning.pytorch.callbacks import ModelCheckpoint as _LightningModelCheckpoint

from midtrain.checkpoint.layout import checkpoint_dir, step_checkpoint
from midtrain.train.callbacks.base import StepCallback


class ModelCheckpoint(_LightningModelCheckpoint):
    """Lightning's ModelCheckpoint, plus one guarantee: the final step of ``fit`` is saved.

    With ``every_n_train_steps`` set, Lightning saves nothing at the end of training unless the
    last step is a multiple of it, so a run of 250 steps saved every 100 would lose its last 50.
    """

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        from midtrain.train._lightning import save_final_checkpoint

        super().on_train_end(trainer, pl_module)
        if not trainer.interrupted:
            save_final_checkpoint(self, trainer)


class CheckpointAtSteps(StepCallback):
    """Save ``step=<N>.ckpt`` when optimizer step N is reached (before step N runs): fork
    points for branches, e.g. every midtraining start step of a study's shared prefix."""

    def __init__(self, steps: list[int], dirpath: str | None = None) -> None:
        self.steps = sorted(set(int(s) for s in steps))
        self.dirpath = dirpath

    def on_optimizer_step_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, step: int
    ) -> None:
        if trainer.global_step in self.steps:  # the state right before that step runs
            directory = Path(self.dirpath) if self.dirpath else checkpoint_dir(trainer)
            # a full, resumable checkpoint (unset, Lightning says so in an info line)
            trainer.save_checkpoint(
                directory / step_checkpoint(trainer.global_step), weights_only=False
            )
