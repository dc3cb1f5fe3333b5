"""``Preemption``: SIGTERM / SIGUSR1 finish the current optimizer step, save ``last.ckpt`` and
exit 143, so a scheduler can requeue the job. See docs/fault-tolerance.md."""

from __future__ import annotations

import atexit
import os
import signal
import subprocess
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info

from midtrain.checkpoint.layout import LAST, checkpoint_dir
from midtrain.errors import MidtrainError
from midtrain.train._lightning import slurm_requeue_signal

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


def slurm_job_id() -> str | None:
    """The job to requeue: ``<array job>_<task>`` for an array task, else ``SLURM_JOB_ID``."""
    array = os.environ.get("SLURM_ARRAY_JOB_ID")
    if array is not None and "SLURM_ARRAY_TASK_ID" in os.environ:
        return f"{array}_{os.environ['SLURM_ARRAY_TASK_ID']}"
    return os.environ.get("SLURM_JOB_ID")


def requeue_slurm_job(job: str) -> bool:
    """``scontrol requeue <job>`` as the process exits; says in one line whether it worked.

    SLURM then stops what is left of the job (SIGTERM, then SIGKILL) and runs its script again
    (``SLURM_RESTART_COUNT`` counts the restarts). SIGTERM is ignored from here on, so this
    process still ends with its own exit code."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        done = subprocess.run(
            ["scontrol", "requeue", job], capture_output=True, text=True, timeout=60
        )
        ok, why = done.returncode == 0, (done.stderr or done.stdout).strip()
    except (OSError, subprocess.SubprocessError) as e:
        ok, why = False, str(e)
    line = (
        f"midtrain: requeued SLURM job {job}; its script runs again "
        "(continue with --ckpt_path last_or_new)"
        if ok
        else f"midtrain: could not requeue SLURM job {job}: scontrol requeue: {why}"
    )
    os.write(2, f"{line}\n".encode())
    return ok


class Preemption(Callback):
    """On a preemption signal: finish the current optimizer step, save ``last.ckpt``, exit 143.

    The checkpoint is taken at an optimizer-step boundary (never inside gradient accumulation),
    so resuming from it with ``--ckpt_path last`` is bitwise equal to an uninterrupted run. The
    handler only sets a flag: a second signal during the save changes nothing. With several
    processes, ranks agree on the stop step with one small all-reduce per optimizer step.

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

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Lightning registers its handlers just before the loop starts; ours take over for the
        # loop (its SIGTERM handler would stop mid-accumulation with exit code 0).
        self.received = None
        self.requeue_signal = slurm_requeue_signal(trainer)
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
        # Preempted: our handlers stay until Lightning's teardown restores the ones from before
        # fit, so a second signal (or a requeue's SIGTERM) cannot start a handler of Lightning's
        # (a save, a collective) while the ranks are tearing down.
        if not isinstance(exception, Preempted):
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
        received, job = self.received, slurm_job_id()
        if received is not None and received == self.requeue_signal and job:
            if trainer.is_global_zero:
                # at exit: a requeue stops the job's processes, so it comes after everything else
                atexit.register(requeue_slurm_job, job)
        elif received is not None and received != signal.SIGTERM:
            previous = self._previous.get(received)
            if callable(previous):
                previous(int(received), None)  # a handler of the user's own
        raise Preempted(self.exit_code)
