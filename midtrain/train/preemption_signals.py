"""Preemption signals from the first moment of ``midtrain fit``: what a SIGTERM or SIGUSR1 does
before the ``Preemption`` callback takes over at the start of training, and the SLURM requeue
both share. Imports only the standard library, so ``midtrain fit`` installs it before torch and
Lightning are imported (a start takes minutes on a GPU node). See docs/fault-tolerance.md.

A signal while the process starts:

- alone (one process), before ``Trainer.fit`` (imports, config, checks: nothing written yet):
  the process exits with code 143 at once;
- with several processes, or once ``Trainer.fit`` runs (the run directory may be written, other
  ranks may wait in a collective): it is recorded, and the ``Preemption`` callback stops every
  rank together at its next agreement point (``setup``, ``on_train_start``), before training;
- either way nothing has been trained, so no checkpoint is written; under SLURM auto-requeue
  (SIGUSR1) rank 0 requeues the job as it exits, as after a preemption during training.
"""

from __future__ import annotations

import atexit
import os
import signal
import subprocess
from typing import Any

EXIT_PREEMPTED = 143  # 128 + SIGTERM: what schedulers expect from a job stopped by a signal
DEFAULT_SIGNALS = ("SIGTERM", "SIGUSR1")  # preemption.signals, before the config is read


class Preempted(SystemExit):
    """Raised after the preemption checkpoint is written; the process exits with its code."""

    code: int


class PreemptedBeforeTraining(Preempted):
    """A preemption signal before training started: nothing to save, nothing written."""


def slurm_job_id() -> str | None:
    """The job to requeue: ``<array job>_<task>`` for an array task, else ``SLURM_JOB_ID``."""
    array = os.environ.get("SLURM_ARRAY_JOB_ID")
    if array is not None and "SLURM_ARRAY_TASK_ID" in os.environ:
        return f"{array}_{os.environ['SLURM_ARRAY_TASK_ID']}"
    return os.environ.get("SLURM_JOB_ID")


def slurm_detected() -> bool:
    """Lightning's rule for "launched by SLURM" (``SLURMEnvironment.detect``, where auto-requeue
    is on by default), for the time before the trainer exists: ``srun`` set ``SLURM_NTASKS``,
    and the job is not named ``bash`` or ``interactive``."""
    return "SLURM_NTASKS" in os.environ and os.environ.get("SLURM_JOB_NAME") not in (
        "bash",
        "interactive",
    )


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


def requeue_at_exit(
    received: signal.Signals | None, requeue_signal: signal.Signals | None, rank_zero: bool
) -> None:
    """Rank 0 requeues the SLURM job as the process exits when the requeue signal stopped the
    run (at exit: the requeue stops the job's processes, so it comes after everything else)."""
    job = slurm_job_id()
    if received is not None and received == requeue_signal and job and rank_zero:
        atexit.register(requeue_slurm_job, job)


class _Watch:
    """The preemption signals received since the process started, until the ``Preemption``
    callback takes over."""

    def __init__(self) -> None:
        self.received: signal.Signals | None = None
        self.at_once = False  # exit from the handler: alone, and nothing written yet
        self.taken_over = False
        self.replaced: dict[signal.Signals, Any] = {}  # the handlers the watch replaced

    def handle(self, signum: int, frame: Any) -> None:
        sig = signal.Signals(signum)
        if self.taken_over:  # a copy Lightning kept, called after the run: as before the watch
            before = self.replaced.get(sig, signal.SIG_DFL)
            if callable(before):
                before(signum, frame)
            elif before == signal.SIG_DFL:
                signal.signal(sig, signal.SIG_DFL)
                signal.raise_signal(sig)
            return
        first = self.received is None
        if first:
            self.received = sig
        if self.at_once:
            os.write(
                2,
                f"midtrain: received {sig.name} while starting; nothing trained yet: exiting "
                f"with code {EXIT_PREEMPTED} without writing anything\n".encode(),
            )
            requeue_at_exit(self.received, signal.SIGUSR1 if slurm_detected() else None, True)
            raise PreemptedBeforeTraining(EXIT_PREEMPTED)
        if first:
            os.write(2, f"midtrain: received {sig.name} while starting\n".encode())


_watch = _Watch()


def watch_from_start(alone: bool) -> None:
    """Handle ``DEFAULT_SIGNALS`` from now on (``midtrain fit`` calls this first thing);
    ``alone``: no other process of this run exists, or is started, before ``Trainer.fit``."""
    _watch.received, _watch.at_once, _watch.taken_over = None, alone, False
    for name in DEFAULT_SIGNALS:
        sig = signal.Signals[name]
        if sig not in _watch.replaced:
            _watch.replaced[sig] = signal.getsignal(sig)
        signal.signal(sig, _watch.handle)


def alone_at_start() -> bool:
    """Whether the environment says this process runs alone: not one rank of several started by
    ``srun``, ``torchrun`` or Lightning's launcher (whose rank 0 starts the others in fit)."""
    for key in ("SLURM_NTASKS", "WORLD_SIZE"):
        value = os.environ.get(key, "1")
        if value.isdigit() and int(value) > 1:
            return False
    return os.environ.get("LOCAL_RANK", "0") == "0"


def run_begins() -> None:
    """``Trainer.fit`` begins: from here on the run may write and start processes, so a signal
    is only recorded, and acted on where every rank agrees (the ``Preemption`` callback)."""
    _watch.at_once = False


def received_while_starting() -> signal.Signals | None:
    """The first preemption signal since the process started (None: none, or not watched)."""
    return _watch.received


def take_over() -> None:
    """The ``Preemption`` callback handles the signals from here on: the handlers from before the
    watch come back (the callback keeps them as the ones to restore and to chain)."""
    _watch.taken_over = True
    for sig, before in _watch.replaced.items():
        if signal.getsignal(sig) == _watch.handle:
            signal.signal(sig, before)


def stop_watching() -> None:
    """The command is over (``midtrain fit`` called from Python): the handlers from before."""
    for sig, before in _watch.replaced.items():
        signal.signal(sig, before)
    _watch.replaced, _watch.received, _watch.at_once = {}, None, False
