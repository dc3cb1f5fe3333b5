"""What TensorBoard shows: the Custom Scalars layout of a run, and the evaluation points.

The Scalars tab opens on the charts that mean something: midtrain logs no ``epoch`` (its runs
are in optimizer steps; Lightning adds one to every value logged through
``LightningModule.log``) and its default logger no placeholder ``hp_metric`` (see
``midtrain.cli.fit.default_logger``)."""

from __future__ import annotations

from collections.abc import Mapping

import lightning.pytorch as pl
from lightning.pytorch.loggers import TensorBoardLogger

# One chart per family in the "Custom Scalars" tab: curves of every domain (or set) together.
LAYOUT = {
    "train": {
        "loss per domain": ["Multiline", [r"train/loss/.*"]],
        "tokens per domain": ["Multiline", [r"train/tokens/.*"]],
    },
    "mixture": {"weight per domain": ["Multiline", [r"mixture/weight/.*"]]},
    "val": {
        "loss per set": ["Multiline", [r"val/.*/loss"]],
        "bits per byte per set": ["Multiline", [r"val/.*/bpb"]],
    },
    "val_ema": {  # midtrain.callbacks.EMA's averaged weights
        "loss per set": ["Multiline", [r"val_ema/.*/loss"]],
        "bits per byte per set": ["Multiline", [r"val_ema/.*/bpb"]],
    },
}


def write_layout(trainer: pl.Trainer) -> None:
    """Write the Custom Scalars layout into each TensorBoard logger of the run (rank 0)."""
    if not trainer.is_global_zero:
        return
    for logger in trainer.loggers:
        if isinstance(logger, TensorBoardLogger):
            logger.experiment.add_custom_scalars(LAYOUT)


def log_evaluation(trainer: pl.Trainer, results: Mapping[str, float], step: int) -> None:
    """Log evaluation results at ``step`` to every logger, with no ``epoch`` beside them."""
    if not results:
        return
    for logger in trainer.loggers:
        logger.log_metrics(dict(results), step=step)
        logger.save()
