"""The one place where midtrain touches Lightning internals (written against lightning 2.6.x;
the ``min`` tox env pins 2.6.0, CI also runs the newest release).

Everything else in midtrain uses Lightning's public API only. Each function here names the
internal it relies on and why no public API does the job; when Lightning changes, this module
is the one to update.
"""

from __future__ import annotations

import signal
from typing import TYPE_CHECKING, Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.environments import SLURMEnvironment

if TYPE_CHECKING:
    from lightning.pytorch.cli import LightningCLI

# -- the CLI and checkpoint contents -------------------------------------------------------------


def checkpoint_datamodule_state(
    checkpoint: dict[str, Any], datamodule: pl.LightningDataModule
) -> dict[str, Any] | None:
    """The data module's ``state_dict`` inside a checkpoint: Lightning's checkpoint connector
    stores it under the class's ``__qualname__`` (read before fit, to refuse a resume before
    Lightning writes anything)."""
    return checkpoint.get(type(datamodule).__qualname__)


def set_run_argument(cli: LightningCLI, subcommand: str, name: str, value: Any) -> None:
    """Change an argument of the trainer method LightningCLI is about to call (e.g. ``fit``'s
    ``ckpt_path`` for ``--fork``): LightningCLI reads them from ``config_init[subcommand]``
    and has no hook to change them after parsing."""
    cli.config_init[subcommand][name] = value


class KeepConfigOnResume:
    """A LightningCLI mixin: ``--ckpt_path <file>`` does not overwrite the model config.

    LightningCLI 2.6 (``_parse_ckpt_path``) loads a checkpoint's hyperparameters over the
    command line's, so ``--ckpt_path x --model.lr 0.01`` silently trains with the checkpoint's lr
    (and a file that is not a checkpoint gives a traceback). midtrain compares the two instead and
    refuses differences in one line (``midtrain.checkpoint.resume.resume_differences``)."""

    def _parse_ckpt_path(self) -> None:
        return None


# -- metrics ------------------------------------------------------------------------------------


def publish_callback_metrics(trainer: pl.Trainer, metrics: dict[str, float]) -> None:
    """Put values into ``trainer.callback_metrics`` (what callbacks and
    ``ModelCheckpoint(monitor=...)`` read) without ``LightningModule.log``.

    ``log`` runs every value through Lightning's result collection, about 0.8 ms per key on
    the CPU: with ten keys and a log every step that was 7% of a small model's step. Lightning
    has no public setter; the property returns its logger connector's own dict, which keeps
    what is written there until the next ``fit``/``validate`` resets it."""
    callback_metrics = trainer.callback_metrics
    for k, v in metrics.items():
        callback_metrics[k] = torch.tensor(v)


def evaluation_log_step(trainer: pl.Trainer) -> int:
    """The step Lightning's logger connector gives the ``val/...`` values of a validation
    during fit, so that values logged beside them (``val_ema/...``) share their step: the fit
    loop's count of batches that stepped, one behind ``global_step`` inside the loop. No public
    API exposes it (LearningRateMonitor reads it the same way)."""
    return trainer.fit_loop.epoch_loop._batches_that_stepped


# -- checkpoints ------------------------------------------------------------------------------------


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


# -- cluster environments -------------------------------------------------------------------------


def slurm_requeue_signal(trainer: pl.Trainer) -> signal.Signals | None:
    """The signal on which the run should requeue its SLURM job: the ``requeue_signal`` of the
    trainer's ``SLURMEnvironment`` when ``auto_requeue`` is on (Lightning's default when it
    detects SLURM), else None.

    The cluster environment lives on the accelerator connector; only parallel strategies expose
    it publicly (``strategy.cluster_environment``), a single-device run under SLURM has it too."""
    environment = trainer._accelerator_connector.cluster_environment
    if isinstance(environment, SLURMEnvironment) and environment.auto_requeue:
        return environment.requeue_signal
    return None


# -- logging ------------------------------------------------------------------------------------


def log_without_epoch(trainer: pl.Trainer) -> None:
    """Values logged through ``LightningModule.log`` reach the loggers without the ``epoch``
    Lightning adds beside them (a flat 0 chart at the top of TensorBoard for runs in optimizer
    steps), at the step Lightning would give them.

    The logger connector's ``log_metrics`` adds ``epoch`` whenever it picks the step itself;
    there is no switch for it, so this wraps that method of this trainer's connector and picks
    the step the same way (a logged ``step`` value, else the fit loop's count of batches that
    stepped)."""
    connector = trainer._logger_connector
    log_metrics = connector.log_metrics

    def without_epoch(metrics: Any, step: int | None = None) -> None:
        if step is None:
            given = metrics.pop("step", None) if isinstance(metrics, dict) else None
            step = (
                int(given)
                if given is not None
                else trainer.fit_loop.epoch_loop._batches_that_stepped
            )
        log_metrics(metrics, step=step)

    connector.log_metrics = without_epoch  # type: ignore[method-assign]  # this trainer's only


def set_evaluation_step(trainer: pl.Trainer, step: int) -> None:
    """The step validate/test results of a checkpoint are logged at: its optimizer step (so
    evaluations of several checkpoints of a run draw a curve). Lightning restores the fit
    loop's counters only for fit, and logs evaluation at the fit loop's count of batches that
    stepped."""
    trainer.fit_loop.epoch_loop._batches_that_stepped = step
