"""Fault tolerance: preemption signals, atomic checkpoint files, the divergence guard, and the
choice and checking of the checkpoint a run resumes from. See docs/fault-tolerance.md.

* ``Preemption`` (a callback the CLI adds): SIGTERM / SIGUSR1 finish the current optimizer
  step, save ``last.ckpt`` and exit 143, so a scheduler can requeue the job.
* ``AtomicCheckpointIO`` (the CLI's default CheckpointIO): every checkpoint file is written to a
  temp name in its own directory, fsynced and renamed — whatever ``TMPDIR`` is.
* ``DivergenceGuard`` (a callback the CLI adds): a non-finite loss or gradient norm stops the
  run (never saving non-finite weights), or with ``on_nonfinite: skip`` skips the step.
* ``resume_checkpoint`` and ``resume_differences``: which checkpoint ``--ckpt_path last``
  means, and what a resume or a fork would silently change.
"""

from __future__ import annotations

import os
import shutil
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.fabric.plugins import TorchCheckpointIO
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.strategies import ModelParallelStrategy
from lightning.pytorch.utilities import rank_zero_info

from midtrain.checkpoint import is_distributed, read_metadata
from midtrain.data.contract import StepDataModule
from midtrain.errors import MidtrainError
from midtrain.paths import LAST, checkpoint_dir

EXIT_PREEMPTED = 143  # 128 + SIGTERM: what schedulers expect from a job stopped by a signal
TEMP_MARK = ".tmp-"  # temp files are ".<name>.tmp-<pid>" next to their destination



class Preempted(SystemExit):
    """Raised after the preemption checkpoint is written; the process exits with its code."""


class Diverged(MidtrainError):
    """A non-finite loss or gradient norm stopped training (exit code 3)."""

    exit_code = 3


# -- atomic checkpoint files -----------------------------------------------------------------

def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_save(obj: Any, path: str | Path) -> Path:
    """``torch.save`` to a temp file in ``path``'s directory, fsync, then ``os.replace``: a
    reader (or a crash) sees the old file or the complete new one, never a partial file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}{TEMP_MARK}{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    return path


def remove_stale_temps(directory: str | Path) -> list[Path]:
    """Temp files a killed save left in a checkpoint directory (call before training starts)."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    stale = list(directory.glob(f".*{TEMP_MARK}*"))
    for p in stale:
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)  # a distributed checkpoint's temp directory
        else:
            p.unlink(missing_ok=True)
    return stale


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's TorchCheckpointIO, writing atomically in the destination directory.

    Lightning's own save goes through an fsspec transaction that stages the file in ``TMPDIR``
    and then moves it: across filesystems (node-local /tmp, run dir on NFS) that move is a copy,
    and a kill during it leaves a truncated checkpoint in place of the good one."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any,
                        storage_options: Any | None = None) -> None:
        if "://" in str(path):  # remote storage: fsspec's transaction is the right tool there
            return super().save_checkpoint(checkpoint, path, storage_options)
        if storage_options is not None:
            raise TypeError("AtomicCheckpointIO.save_checkpoint: storage_options are not used")
        atomic_save(checkpoint, path)
        return None


def use_atomic_checkpoints(trainer: pl.Trainer) -> None:
    """Swap the strategy's default CheckpointIO for ``AtomicCheckpointIO`` (a user's own
    CheckpointIO plugin is kept); distributed checkpoint directories are written to a temp
    directory and renamed."""
    strategy = trainer.strategy
    if type(strategy.checkpoint_io) is TorchCheckpointIO:
        strategy.checkpoint_io = AtomicCheckpointIO()
    if isinstance(strategy, ModelParallelStrategy):  # writes sharded directories in place
        strategy.save_checkpoint = _atomic_directory_save(strategy)


def _atomic_directory_save(strategy: Any) -> Callable[..., None]:
    """Wrap ``ModelParallelStrategy.save_checkpoint`` (which writes shards in place): every rank
    writes into ``.<name>.tmp-<pid>`` next to the destination; rank 0 then swaps it in. A crash
    leaves the old checkpoint (or, between the two renames, ``.<name>.tmp-old``: resume falls
    back to the newest other checkpoint)."""
    save = strategy.save_checkpoint

    def atomic(checkpoint: dict[str, Any], filepath: Any, storage_options: Any = None) -> None:
        path = Path(strategy.broadcast(str(filepath)))
        tmp = path.parent / f".{path.name}{TEMP_MARK}{strategy.broadcast(os.getpid())}"
        save(checkpoint, tmp, storage_options)
        strategy.barrier()
        if strategy.global_rank == 0:
            for f in tmp.rglob("*"):
                if f.is_file():
                    with open(f, "rb") as handle:
                        os.fsync(handle.fileno())
            old = path.parent / f".{path.name}{TEMP_MARK}old"
            if path.exists():
                os.replace(path, old)
            os.replace(tmp, path)
            _fsync_dir(path.parent)
            if old.is_dir():
                shutil.rmtree(old)
            elif old.exists():
                old.unlink()
        strategy.barrier()

    return atomic


# -- preemption --------------------------------------------------------------------------------


def _signal_number(name: str) -> signal.Signals:
    sig = getattr(signal, name.upper() if name.upper().startswith("SIG") else f"SIG{name.upper()}",
                  None)
    if not isinstance(sig, signal.Signals) or sig in (signal.SIGKILL, signal.SIGSTOP):
        raise MidtrainError(f"preemption.signals: {name!r} is not a signal that can be handled "
                            "(e.g. SIGTERM, SIGUSR1)")
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
            os.write(2, f"midtrain: received {self.received.name}; saving a checkpoint after "
                        "the current optimizer step\n".encode())

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

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                     exception: BaseException) -> None:
        self._restore()

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           outputs: object, batch: object, batch_idx: int) -> None:
        if (batch_idx + 1) % trainer.accumulate_grad_batches:
            return  # inside an accumulation: the optimizer step is not finished yet
        stop = self.received is not None
        if trainer.world_size > 1:
            stop = trainer.strategy.reduce_boolean_decision(stop, all=False)
        if not stop:
            return
        path = checkpoint_dir(trainer) / LAST
        trainer.save_checkpoint(path)
        name = self.received.name if self.received is not None else "a preemption signal"
        rank_zero_info(f"preempted by {name} after optimizer step {trainer.global_step}: saved "
                       f"{path}; continue with `midtrain fit ... --ckpt_path last`")
        previous = self._previous.get(self.received) if self.received is not None else None
        if self.received != signal.SIGTERM and callable(previous):
            previous(int(self.received), None)  # e.g. Lightning's SLURM requeue handler
        raise Preempted(self.exit_code)


# -- divergence guard --------------------------------------------------------------------------

class DivergenceGuard(Callback):
    """Stops training at a non-finite loss or gradient norm, or skips such steps.

    ``on_nonfinite: stop`` (default) adds no host synchronisation to a training step: the first
    non-finite value is recorded on the device and checked on the host at logging steps
    (``trainer.log_every_n_steps``), at the end of training and before every checkpoint save —
    a checkpoint with non-finite weights is never written, so ``last.ckpt`` stays the last good
    state. The run stops with one line naming the step and value (exit code 3).

    ``on_nonfinite: skip`` checks every step on the host (one sync per step): a step whose
    gradient norm is not finite is skipped (no parameter or optimizer-state update; the data and
    the LR schedule move on), counted and logged as ``train/skipped_steps``; ``max_skips`` skips
    in a row stop the run.

    Args:
        on_nonfinite: ``stop`` or ``skip``.
        max_skips: in ``skip`` mode, consecutive skipped steps that stop the run.
    """

    def __init__(self, on_nonfinite: Literal["stop", "skip"] = "stop",
                 max_skips: int = 10) -> None:
        if on_nonfinite not in ("stop", "skip"):
            raise MidtrainError(f"divergence.on_nonfinite: {on_nonfinite!r}; use stop or skip")
        if max_skips < 1:
            raise MidtrainError(f"divergence.max_skips: must be >= 1, got {max_skips}")
        self.on_nonfinite = on_nonfinite
        self.max_skips = max_skips
        self.skipped = 0
        self.skipped_in_a_row = 0
        # device-side: [first bad optimizer step or -1, its value, 0 = loss / 1 = grad norm]
        self._first: torch.Tensor | None = None
        self._step: torch.Tensor | None = None  # optimizer step counter, on the device

    def state_dict(self) -> dict[str, Any]:
        return {"skipped": self.skipped, "skipped_in_a_row": self.skipped_in_a_row}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.skipped = int(state_dict.get("skipped", 0))
        self.skipped_in_a_row = int(state_dict.get("skipped_in_a_row", 0))

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        device = pl_module.device
        self._first = torch.tensor([-1.0, 0.0, 0.0], dtype=torch.float64, device=device)
        self._step = torch.tensor(float(trainer.global_step), dtype=torch.float64, device=device)

    def _record(self, value: torch.Tensor, kind: int) -> None:
        if self._first is None or self._step is None:
            return
        value = value.detach().to(torch.float64).reshape(())
        new = torch.stack([self._step, value, torch.full_like(value, kind)])
        take = (~torch.isfinite(value)) & (self._first[0] < 0)
        self._first = torch.where(take, new, self._first)

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                                 optimizer: torch.optim.Optimizer) -> None:
        grads = [p.grad for p in pl_module.parameters() if p.grad is not None]
        if not grads:
            return
        norm = torch.nn.utils.get_total_norm(grads)
        if hasattr(norm, "full_tensor"):  # a DTensor under FSDP2
            norm = norm.full_tensor()
        if self.on_nonfinite == "stop":
            self._record(norm, 1)
            return
        if bool(torch.isfinite(norm)):  # skip mode: one host sync per step, documented
            self.skipped_in_a_row = 0
        else:
            for p in pl_module.parameters():
                p.grad = None  # AdamW leaves parameters without a gradient untouched
            self.skipped += 1
            self.skipped_in_a_row += 1
            rank_zero_info(f"divergence guard: skipped optimizer step {trainer.global_step} "
                           f"(gradient norm {float(norm)}); {self.skipped} skipped so far")
        pl_module.log("train/skipped_steps", float(self.skipped), on_step=True, on_epoch=False,
                      batch_size=1)
        if self.skipped_in_a_row >= self.max_skips:
            raise Diverged(
                f"divergence: {self.skipped_in_a_row} optimizer steps in a row had a non-finite "
                f"gradient norm (last at step {trainer.global_step}; divergence.max_skips "
                f"{self.max_skips}); {self._last_good(trainer)}")

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           outputs: Any, batch: object, batch_idx: int) -> None:
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if self.on_nonfinite == "stop" and isinstance(loss, torch.Tensor):
            self._record(loss, 0)
        if (batch_idx + 1) % trainer.accumulate_grad_batches:
            return
        if self._step is not None:
            self._step += 1
        if trainer.global_step % max(trainer.log_every_n_steps, 1) == 0:
            self.check(trainer)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.check(trainer)

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        self.check(trainer)
        finite = [torch.isfinite(_local(t)).all() for t in checkpoint.get("state_dict", {}).values()
                  if isinstance(t, torch.Tensor) and t.is_floating_point()]
        bad = bool(finite) and not bool(torch.stack(finite).all())
        if trainer.world_size > 1:
            bad = trainer.strategy.reduce_boolean_decision(bad, all=False)
        if bad:
            raise Diverged(f"divergence: the weights at step {trainer.global_step} are not "
                           f"finite; no checkpoint written; {self._last_good(trainer)}")

    def check(self, trainer: pl.Trainer) -> None:
        """Raise ``Diverged`` if a non-finite value was recorded (one host sync)."""
        if self._first is None:
            return
        step, value, kind = self._first.tolist()
        bad = step >= 0
        if trainer.world_size > 1:
            bad = trainer.strategy.reduce_boolean_decision(bad, all=False)
        if not bad:
            return
        what = "gradient norm" if kind else "loss"
        where = f"{what} {value} at optimizer step {int(step)}" if step >= 0 else "on another rank"
        raise Diverged(f"divergence: non-finite {where}; training stopped; lower model.lr or "
                       f"set divergence.on_nonfinite: skip; {self._last_good(trainer)}")

    @staticmethod
    def _last_good(trainer: pl.Trainer) -> str:
        last = checkpoint_dir(trainer) / LAST
        return f"the last good checkpoint is {last}" if last.exists() else "no checkpoint kept"


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


# -- which checkpoint a run resumes from ------------------------------------------------------

def loadable(path: Path) -> tuple[dict[str, Any] | None, str]:
    """(metadata, "") of a complete checkpoint, or (None, why not)."""
    try:
        meta = read_metadata(path)
    except MidtrainError as e:
        return None, str(e)
    except Exception as e:  # truncated zip, text file, pickle error: all "not a checkpoint"
        return None, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}".strip()
    if not isinstance(meta, dict) or "global_step" not in meta:
        return None, "not a Lightning checkpoint (no global_step)"
    return meta, ""


def check_checkpoint(path: str | Path, what: str) -> dict[str, Any]:
    """The metadata of a checkpoint given on the command line, or a one-line error."""
    path = Path(path)
    if not path.exists():
        raise MidtrainError(f"{what}: checkpoint not found: {path}")
    meta, why = loadable(path)
    if meta is None:
        raise MidtrainError(f"{what}: {path} is not a readable checkpoint ({why})")
    return meta


def run_checkpoints_in(directory: Path) -> list[Path]:
    """Checkpoint files and distributed checkpoint directories in a checkpoint directory."""
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.iterdir()
                  if not p.name.startswith(".")
                  and ((p.is_file() and p.suffix == ".ckpt") or is_distributed(p)))


def resume_checkpoint(directory: Path, say: Callable[[str], None]) -> Path | None:
    """The newest loadable checkpoint of a run (by optimizer step; ``last.ckpt`` wins a tie),
    saying which and why; corrupt ones are reported and skipped. None when there is none."""
    found: list[tuple[int, bool, float, Path]] = []
    for path in run_checkpoints_in(directory):
        meta, why = loadable(path)
        if meta is None:
            say(f"midtrain: skipping {path}: not loadable ({why})")
            continue
        found.append((int(meta["global_step"]), path.name == LAST, path.stat().st_mtime, path))
    if not found:
        return None
    step, _, _, path = max(found)
    say(f"midtrain: resuming from {path} (optimizer step {step}), the newest loadable checkpoint "
        f"of {directory}")
    return path


# -- what a resume must agree with -------------------------------------------------------------

# How the global batch is split is recorded but may change on resume (e.g. 2 processes -> 1
# with twice the micro batch): the data stream is the same; the sums differ in rounding only.
ELASTIC_KEYS = ("data.micro_batch_size", "trainer.accumulate_grad_batches", "world size")
# Keys that shape what happened before the checkpoint: a fork cannot change them either.
PAST_KEYS = ("data.store", "data.seq_len", "data.max_length", "data.packing", "data.seed",
             "data.global_batch_size", "model.shape", "model.decay_1d_params")


def run_record(model: Any, datamodule: Any, trainer: pl.Trainer) -> dict[str, Any]:
    """Everything that shapes a run's data stream and optimisation, by config key."""
    record: dict[str, Any] = {}
    if isinstance(datamodule, StepDataModule):
        # what the data module says its stream depends on (store, seq_len or max_length and
        # packing, seed); the mixture schedule is compared by its own load_state_dict
        for key, value in datamodule.fingerprint().items():
            if key != "phases":
                record[f"data.{key}"] = value
        micro = datamodule.micro_batch_size
        record.update({
            "data.global_batch_size": micro * trainer.accumulate_grad_batches * trainer.world_size,
            "data.micro_batch_size": micro,
            "trainer.accumulate_grad_batches": trainer.accumulate_grad_batches,
            "world size": trainer.world_size,
        })
    config = getattr(model, "config", None)
    if config is not None:
        from dataclasses import asdict

        record["model.shape"] = asdict(config)
    hp = getattr(model, "hparams", {})
    for key in ("lr", "min_lr", "warmup", "lr_schedule", "decay_fraction", "weight_decay",
                "decay_1d_params", "eps"):
        if key in hp:
            record[f"model.{key}"] = hp[key]
    if "betas" in hp:
        record["model.betas"] = [float(b) for b in hp["betas"]]
    record["trainer.max_steps"] = trainer.max_steps
    return record


def _show(key: str, saved: Any, now: Any) -> str:
    if isinstance(saved, dict) and isinstance(now, dict):
        keys = [k for k in sorted(set(saved) | set(now)) if saved.get(k) != now.get(k)]
        return ", ".join(f"{key}.{k} {saved.get(k)!r} -> {now.get(k)!r}" for k in keys)
    return f"{key} {saved!r} -> {now!r}"


def resume_differences(saved: dict[str, Any], now: dict[str, Any],
                       fork: bool) -> list[str]:
    """Differences between a checkpoint's run record and this run's, as ``key old -> new``:
    all of them for a resume; for a fork only those that change the past."""
    keys = [k for k in now if k in saved and saved[k] != now[k] and k not in ELASTIC_KEYS]
    if fork:
        keys = [k for k in keys if k in PAST_KEYS]
    return [_show(k, saved[k], now[k]) for k in keys]


def say(line: str) -> None:
    """A line for the user, on stderr (stdout may be a results table)."""
    print(line, file=sys.stderr, flush=True)
