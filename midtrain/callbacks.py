"""The callbacks users put in ``trainer.callbacks``, by the names they type
(``midtrain.callbacks.MixtureSwitch``). They live in ``midtrain.train.callbacks`` (one module
each) and, for ``DownstreamEval``, in ``midtrain.evaluation``."""

from midtrain.evaluation.callback import DownstreamEval
from midtrain.train.callbacks import (
    EMA,
    AdaptiveMixture,
    CheckpointAtSteps,
    DivergenceGuard,
    MixtureLogging,
    MixtureSwitch,
    ModelCheckpoint,
    Preemption,
    RunSummary,
    Throughput,
)

__all__ = [
    "AdaptiveMixture",
    "CheckpointAtSteps",
    "DivergenceGuard",
    "DownstreamEval",
    "EMA",
    "MixtureLogging",
    "MixtureSwitch",
    "ModelCheckpoint",
    "Preemption",
    "RunSummary",
    "Throughput",
]
