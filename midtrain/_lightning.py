"""The Lightning internals midtrain cannot avoid, in one place. Written against lightning 2.6:
on a Lightning upgrade, check these functions first. Each says why no public API does it."""

from __future__ import annotations

import lightning.pytorch as pl
from lightning.pytorch.callbacks import ModelCheckpoint

# -- checkpoints (fault helper) -----------------------------------------------------------------


def save_final_checkpoint(callback: ModelCheckpoint, trainer: pl.Trainer) -> None:
    """What ``ModelCheckpoint`` does at a save step (top-k and ``last``), at the end of fit.

    With ``every_n_train_steps``, Lightning saves nothing after the final step unless it is a
    multiple; ModelCheckpoint has no public "save now" (``trainer.save_checkpoint`` would bypass
    its top-k bookkeeping and ``last`` naming), so this calls its private save methods."""
    if callback._should_skip_saving_checkpoint(trainer):
        return
    candidates = callback._monitor_candidates(trainer)
    if callback.monitor is None or callback.monitor in candidates:
        callback._save_topk_checkpoint(trainer, candidates)
    callback._save_last_checkpoint(trainer, candidates)


class KeepConfigOnResume:
    """A LightningCLI mixin: ``--ckpt_path <file>`` does not overwrite the model config.

    LightningCLI 2.6 (``_parse_ckpt_path``) loads a checkpoint's hyperparameters over the
    command line's, so ``--ckpt_path x --model.lr 0.01`` silently trains with the checkpoint's lr
    (and a file that is not a checkpoint gives a traceback). midtrain compares the two instead and
    refuses differences in one line (``midtrain.fault.resume_differences``)."""

    def _parse_ckpt_path(self) -> None:
        return None
