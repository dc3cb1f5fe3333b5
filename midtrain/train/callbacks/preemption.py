"""``Preemption``: SIGTERM / SIGUSR1 finish the current optimizer step, save ``last.ckpt`` and
exit 143, so a scheduler can requeue the job; a signal while the run starts (before training,
``midtrain.train.preemption_signals``) stops every rank before training, with nothing to save.
See docs/fault-tolerance.md."""

from __future__ import annotations

import os
import signal
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_info

from midtrain.checkpoint.layout import LAST, checkpoint_dir
from midtrain.errors import MidtrainError
from midtrain.train import preemption_signals
from midtrain.train._lightning import slurm_requeue_signal
from midtrain.train.callbacks.base import StepCallback
from midtrain.train.preemption_signals import (
    EXIT_PREEMPTED,
    Preempted,
    PreemptedBeforeTraining,
    requeue_at_exit,
    slurm_job_id,
)

__all__ = ["EXIT_PREEMPTED", "Preempted", "Preemption", "slurm_job_id"]


def _signal_number(name: str) -> signal.Signals:
    sig = getattr(
        signal, name.upper() if name.upper().startswith("SIG") else f"SIG{name.upper()}", None
    )
    if not isinstance(sig, signal.Signals) or sig in (signal.SIGKILL, signal.SIGSTOP):
        raise MidtrainError(
            f"preemption.signals: {name!r} is not a signal that can be handled "
            "(e.g. SIGTERM, SIGUSR1)"
        )
    return sig


class Preemption(StepCallback):
    """On a preemption signal: finish the current optimizer step, save ``last.ckpt``, exit 143.

    The checkpoint is taken at an optimizer-step boundary (never inside gradient accumulation),
    so resuming from it with ``--ckpt_path last`` is bitwise equal to an uninterrupted run. The
    handler only sets a flag: a second signal during the save changes nothing. With several
    processes, ranks agree on the stop step with one small all-reduce per optimizer step.

    A signal that ``midtrain fit`` received while starting (``preemption_signals``, from the
    first moment of the process) stops the run before training, on every rank together: in
    ``setup`` (the processes exist; of the run, only its event file is created) or else in
    ``on_train_start``, with code ``exit_code`` and no checkpoint (nothing was trained).

    Under SLURM with auto-requeue (Lightning's ``SLURMEnvironment``, detected by default), the
    requeue signal (SIGUSR1) also requeues the job: rank 0 runs ``scontrol requeue`` as the
    process exits, after the checkpoint and the run summary. Lightning's own handler is not
    called: it would save the same state again as ``hpc_ckpt_<n>.ckpt`` and requeue while the
    ranks are still tearing down (SLURM then stops them mid-teardown).

    Args:
        signals: the signals that mean "preempted" (names, e.g. ``[SIGTERM, SIGUSR1]``).
        exit_code: the process exit code after the checkpoint (143 = 128 + SIGTERM).
    """

    def __init__(self, signals: list[str] | None = None, exit_code: int = EXIT_PREEMPTED) -> None:
        self.signals = list(signals) if signals is not None else ["SIGTERM", "SIGUSR1"]
        self.numbers = [_signal_number(s) for s in self.signals]
        self.exit_code = exit_code
        self.received: signal.Signals | None = None
        self.requeue_signal: signal.Signals | None = None  # SLURM auto-requeue's signal, if on
        self._previous: dict[signal.Signals, Any] = {}

    def _handle(self, signum: int, frame: object) -> None:
        if self.received is None:
            self.received = signal.Signals(signum)
            os.write(
                2,
                f"midtrain: received {self.received.name}; saving a checkpoint after "
                "the current optimizer step\n".encode(),
            )

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            self.received = None
            self._stop_before_training(trainer, preemption_signals.received_while_starting())

    def on_sanity_check_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._take_over(trainer)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._take_over(trainer)
        received = self.received or preemption_signals.received_while_starting()
        self._stop_before_training(trainer, received)

    def _take_over(self, trainer: pl.Trainer) -> None:
        """Lightning registers its handlers just before the sanity check and the loop; ours take
        over (its SIGTERM handler would end the sanity check, or a step inside an accumulation,
        with exit code 0)."""
        if self._previous:
            return
        preemption_signals.take_over()
        self.requeue_signal = slurm_requeue_signal(trainer)
        for sig in self.numbers:
            self._previous[sig] = signal.getsignal(sig)
            signal.signal(sig, self._handle)

    def _stop_before_training(self, trainer: pl.Trainer, received: signal.Signals | None) -> None:
        """Every rank stops if any received a signal while starting (one small all-reduce:
        no rank is left waiting in a collective); nothing is trained, so nothing is saved."""
        stop = received is not None
        if trainer.world_size > 1:
            stop = trainer.strategy.reduce_boolean_decision(stop, all=False)
        if not stop:
            return
        name = received.name if received is not None else "a preemption signal (another rank)"
        rank_zero_info(
            f"preempted by {name} before training: nothing to save; continue with "
            "`midtrain fit ... --ckpt_path last_or_new`"
        )
        requeue_at_exit(received, slurm_requeue_signal(trainer), trainer.is_global_zero)
        raise PreemptedBeforeTraining(self.exit_code)

    def _restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
        self._previous = {}

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._restore()

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        # Preempted: our handlers stay until Lightning's teardown restores the ones from before
        # fit, so a second signal (or a requeue's SIGTERM) cannot start a handler of Lightning's
        # (a save, a collective) while the ranks are tearing down.
        if not isinstance(exception, Preempted):
            self._restore()

    def on_optimizer_step_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, step: int
    ) -> None:
        # never inside an accumulation: the step is finished
        stop = self.received is not None
        if trainer.world_size > 1:
            stop = trainer.strategy.reduce_boolean_decision(stop, all=False)
        if not stop:
            return
        path = checkpoint_dir(trainer) / LAST
        # a full, resumable checkpoint (unset, Lightning says so in an info line)
        trainer.save_checkpoint(path, weights_only=False)
        name = self.received.name if self.received is not None else "a preemption signal"
        rank_zero_info(
            f"preempted by {name} after optimizer step {trainer.global_step}: saved "
            f"{path}; continue with `midtrain fit ... --ckpt_path last`"
        )
        received = self.received
        if received is not None and received == self.requeue_signal and slurm_job_id():
            requeue_at_exit(received, self.requeue_signal, trainer.is_global_zero)
        elif received is not None and received != signal.SIGTERM:
            previous = self._previous.get(received)
            if callable(previous):
                previous(int(received), None)  # a handler of the user's own
        raise Preempted(self.exit_code)
