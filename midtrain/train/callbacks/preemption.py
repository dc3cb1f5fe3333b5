"""``Preemption``: SIGTERM / SIGUSR1 finish the current optimizer step, save ``last.ckpt`` and
exit 143, so a scheduler can requeue the job. See docs/fault-tolerance.md."""

from __future__ import annotations

import os
import signal
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info

from midtrain.checkpoint.layout import LAST, checkpoint_dir
from midtrain.errors import MidtrainError

EXIT_PREEMPTED = 143  # 128 + SIGTERM: what schedulers expect from a job stopped by a signal


class Preempted(SystemExit):
    """Raised after the preemption checkpoint is written; the process exits with its code."""

    code: int


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


class Preemption(Callback):
    """On a preemption signal: finish the current optimizer step, save ``last.ckpt``, exit 143.

    The checkpoint is taken at an optimizer-step boundary (never inside gradient accumulation),
    so resuming from it with ``--ckpt_path last`` is bitwise equal to an uninterrupted run. The
    handler only sets a flag: a second signal during the save changes nothing. With several
    processes, ranks agree on the stop step with one small all-reduce per optimizer step.

    Under SLURM with Lightning's auto-requeue (``SLURMEnvironment``), Lightning's own handler for
    the requeue signal (it saves ``hpc_ckpt_<n>.ckpt`` and runs ``scontrol requeue``) is called
    too — after our checkpoint, at the step boundary instead of in the middle of a step.

    Args:
        signals: the signals that mean "preempted" (names, e.g. ``[SIGTERM, SIGUSR1]``).
        exit_code: the process exit code after the checkpoint (143 = 128 + SIGTERM).
    """

    def __init__(self, signals: list[str] | None = None, exit_code: int = EXIT_PREEMPTED) -> None:
        self.signals = list(signals) if signals is not None else ["SIGTERM", "SIGUSR1"]
        self.numbers = [_signal_number(s) for s in self.signals]
        self.exit_code = exit_code
        self.received: signal.Signals | None = None
        self._previous: dict[signal.Signals, Any] = {}

    def _handle(self, signum: int, frame: object) -> None:
        if self.received is None:
            self.received = signal.Signals(signum)
            os.write(
                2,
                f"midtrain: received {self.received.name}; saving a checkpoint after "
                "the current optimizer step\n".encode(),
            )

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Lightning registers its handlers just before the loop starts; ours take over for the
        # loop (its SIGTERM handler would stop mid-accumulation with exit code 0).
        self.received = None
        for sig in self.numbers:
            self._previous[sig] = signal.getsignal(sig)
            signal.signal(sig, self._handle)

    def _restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
        self._previous = {}

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._restore()

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        self._restore()

    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: object,
        batch: object,
        batch_idx: int,
    ) -> None:
        if (batch_idx + 1) % trainer.accumulate_grad_batches:
            return  # inside an accumulation: the optimizer step is not finished yet
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
        previous = self._previous.get(self.received) if self.received is not None else None
        if self.received is not None and self.received != signal.SIGTERM and callable(previous):
            previous(int(self.received), None)  # e.g. Lightning's SLURM requeue handler
        raise Preempted(self.exit_code)
