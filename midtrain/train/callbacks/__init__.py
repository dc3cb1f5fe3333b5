"""Training callbacks, one module each. They stay thin: the data module owns the schedule,
the model owns its metrics, ``midtrain.checkpoint`` owns checkpoint files; a callback decides
when, and asks them."""

from midtrain.train.callbacks.adaptive import AdaptiveMixture
from midtrain.train.callbacks.checkpoints import CheckpointAtSteps, ModelCheckpoint
from midtrain.train.callbacks.divergence import DivergenceGuard
from midtrain.train.callbacks.ema import EMA
from midtrain.train.callbacks.mixture import MixtureLogging, MixtureSwitch
from midtrain.train.callbacks.preemption import Preemption
from midtrain.train.callbacks.summary import RunSummary
from midtrain.train.callbacks.throughput import Throughput

__all__ = [
    "AdaptiveMixture",
    "CheckpointAtSteps",
    "DivergenceGuard",
    "EMA",
    "MixtureLogging",
    "MixtureSwitch",
    "ModelCheckpoint",
    "Preemption",
    "RunSummary",
    "Throughput",
]
