"""The callbacks users put in ``trainer.callbacks``, by the names they type
(``midtrain.callbacks.MixtureSwitch``). They live in ``midtrain.train.callbacks`` (one module
each) and, for ``DownstreamEval``, in ``midtrain.evaluation``."""

from midtrain.evaluation.callback import DownstreamEval as DownstreamEval
from midtrain.train import callbacks as _train
from midtrain.train.callbacks import *  # noqa: F403  (every training callback, by its name)

__all__ = sorted([*_train.__all__, "DownstreamEval"])
