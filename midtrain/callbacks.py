"""Callbacks users put in ``trainer.callbacks`` (or that the CLI adds by default)."""

from __future__ import annotations

import lightning.pytorch as pl
from lightning.pytorch.callbacks import ModelCheckpoint as _LightningModelCheckpoint


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
