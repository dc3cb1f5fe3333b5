"""Callbacks users put in ``trainer.callbacks`` (or that the CLI adds by default)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.fabric.utilities.throughput import Throughput as FabricThroughput
from lightning.fabric.utilities.throughput import get_available_flops
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.callbacks import ModelCheckpoint as _LightningModelCheckpoint
from lightning.pytorch.utilities import rank_zero_info

from midtrain.data.contract import require_contract, require_max_steps
from midtrain.errors import MidtrainError
from midtrain.evaluation.callback import DownstreamEval  # noqa: F401  (re-exported)
from midtrain.metrics import is_logging_step
from midtrain.paths import checkpoint_dir, step_checkpoint, switch_checkpoint


class ModelCheckpoint(_LightningModelCheckpoint):
    """Lightning's ModelCheckpoint, plus one guarantee: the final step of ``fit`` is saved.

    With ``every_n_train_steps`` set, Lightning saves nothing at the end of training unless the
    last step is a multiple of it, so a run of 250 steps saved every 100 would lose its last 50.
    """

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        from midtrain._lightning import save_final_checkpoint

        super().on_train_end(trainer, pl_module)
        if not trainer.interrupted:
            save_final_checkpoint(self, trainer)


class MixtureSwitch(Callback):
    """Switch the data mixture at an optimizer step.

    The first batch of optimizer step ``step`` (or ``round(fraction * max_steps)``) is drawn
    from ``weights`` — exactly, for any num_workers, prefetch_factor, gradient accumulation and
    world size, because the switch registers with the data module (``add_switch``) in ``setup``,
    before training starts, and the data module folds it into its schedule (a switch applied
    from a hook would reach the model late: the loader runs ahead).

    At the switch it logs the event and, with ``save_checkpoint``, writes
    ``switch-step=<N>.ckpt`` next to the run's checkpoints: the state right before step N, which
    ``midtrain fit --fork`` branches from. Use several callbacks for several phases.
    """

    def __init__(self, weights: dict[str, float], step: int | None = None,
                 fraction: float | None = None, save_checkpoint: bool = True) -> None:
        if (step is None) == (fraction is None):
            raise MidtrainError("MixtureSwitch: give exactly one of `step` or `fraction`")
        if fraction is not None and not 0 < fraction < 1:
            raise MidtrainError(f"MixtureSwitch.fraction: must be in (0, 1), got {fraction}")
        self.weights = dict(weights)
        self.step = step
        self.fraction = fraction
        self.save_checkpoint = save_checkpoint

    def resolve_step(self, max_steps: int) -> int:
        if self.step is not None:
            return int(self.step)
        return int(round(self.fraction * max_steps))  # type: ignore[operator]

    def register(self, datamodule: Any, max_steps: int) -> None:
        """Register this switch with the data module that owns the schedule (idempotent)."""
        if not hasattr(datamodule, "add_switch"):
            raise MidtrainError(
                f"MixtureSwitch: the data module {type(datamodule).__name__} has no mixture "
                "schedule (add_switch); use it with midtrain.MixtureDataModule"
            )
        datamodule.add_switch(self.resolve_step(max_steps), self.weights, max_steps, owner=self)

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            max_steps = require_max_steps(trainer, "MixtureSwitch steps are optimizer steps")
            self.register(trainer.datamodule, max_steps)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           outputs: object, batch: object, batch_idx: int) -> None:
        step = self.resolve_step(trainer.max_steps)
        stepped = (batch_idx + 1) % trainer.accumulate_grad_batches == 0
        if not stepped or trainer.global_step != step:
            return
        rank_zero_info(f"mixture switch before step {step}: {self.weights}")
        if self.save_checkpoint:
            trainer.save_checkpoint(checkpoint_dir(trainer) / switch_checkpoint(step))


class CheckpointAtSteps(Callback):
    """Save ``step=<N>.ckpt`` when optimizer step N is reached (before step N runs): fork
    points for branches, e.g. every midtraining start step of a study's shared prefix."""

    def __init__(self, steps: list[int], dirpath: str | None = None) -> None:
        self.steps = sorted(set(int(s) for s in steps))
        self.dirpath = dirpath

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           outputs: object, batch: object, batch_idx: int) -> None:
        stepped = (batch_idx + 1) % trainer.accumulate_grad_batches == 0
        if stepped and trainer.global_step in self.steps:
            directory = Path(self.dirpath) if self.dirpath else checkpoint_dir(trainer)
            trainer.save_checkpoint(directory / step_checkpoint(trainer.global_step))


class MixtureLogging(Callback):
    """Logs ``mixture/weight/<domain>`` (the schedule's normalised weight, from the data
    module's ``weights_at``) for every domain with weight in some phase, on logging steps and
    always on both sides of a phase start, so the curve steps exactly at the switch whatever
    ``log_every_n_steps`` is. A weight of 0 here is the schedule, not a stale measurement.
    The ``midtrain`` command adds it by default."""

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           outputs: object, batch: object, batch_idx: int) -> None:
        if (batch_idx + 1) % trainer.accumulate_grad_batches or trainer.datamodule is None:
            return
        data = require_contract(trainer.datamodule)
        step = trainer.global_step - 1  # the optimizer step just taken
        starts = data.phase_starts()
        if not is_logging_step(step, trainer.log_every_n_steps, trainer.max_steps, starts):
            return
        used = {d for s in starts for d, w in data.weights_at(s).items() if w > 0}
        weights = {f"mixture/weight/{d}": w for d, w in data.weights_at(step).items()
                   if d in used}
        for logger in trainer.loggers:
            logger.log_metrics(weights, step=step)


# compute dtype of a Trainer precision, for the device's peak FLOP/s (MFU)
_PRECISION_DTYPES = {"bf16-mixed": torch.bfloat16, "bf16-true": torch.bfloat16,
                     "16-mixed": torch.float16, "16-true": torch.float16,
                     "64-true": torch.float64}


class Throughput(Callback):
    """Training throughput, logged on logging steps as ``train/device/batches_per_sec``,
    ``.../samples_per_sec`` (sequences), ``.../items_per_sec`` (tokens) and, where the model
    reports ``flops_per_batch``, ``.../flops_per_sec`` and (where the device's peak FLOP/s is
    known: GPUs) ``.../mfu``; with several processes also the totals without ``device/``; plus
    ``train/time``, ``train/batches``, ``train/samples``, ``train/lengths`` (cumulative).
    Rates are over the last ``window_size`` micro-batches (Lightning Fabric's ``Throughput``).
    Tokens/s also appears in the progress bar.

    Sync-free between logging steps: the clock is read every micro-batch, and the device is
    synchronised only before the time of a logging step is taken, so each logged rate spans
    exact device time.
    """

    def __init__(self, window_size: int = 20, separator: str = "/") -> None:
        self.window_size = window_size
        self.separator = separator
        self._throughput: FabricThroughput | None = None
        self._t0 = self._validation_start = 0.0
        self._batches = self._samples = self._tokens = 0

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        dtype = _PRECISION_DTYPES.get(str(trainer.precision), torch.float32)
        self._throughput = FabricThroughput(
            available_flops=get_available_flops(trainer.strategy.root_device, dtype),
            world_size=trainer.world_size, window_size=self.window_size,
            separator=self.separator)
        self._t0 = time.perf_counter()
        self._batches = self._samples = self._tokens = 0

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           outputs: Any, batch: Any, batch_idx: int) -> None:
        if self._throughput is None or not trainer.is_global_zero:
            return
        stepped = (batch_idx + 1) % trainer.accumulate_grad_batches == 0
        step = trainer.global_step - 1 if stepped else None  # the optimizer step just taken
        logging = step is not None and _logs(trainer, pl_module, step)
        if logging and trainer.strategy.root_device.type == "cuda":
            torch.cuda.synchronize()  # the logged window ends at exact device time
        self._batches += 1
        self._samples += int(batch["input_ids"].shape[0])
        self._tokens += int(batch["input_ids"].numel())
        self._throughput.update(time=time.perf_counter() - self._t0, batches=self._batches,
                                samples=self._samples, lengths=self._tokens,
                                flops=getattr(pl_module, "flops_per_batch", None))
        bar = trainer.progress_bar_callback is not None
        if not stepped or not (logging or bar):
            return
        metrics = self._throughput.compute()
        if logging:
            logged = {f"train{self.separator}{k}": v for k, v in metrics.items()}
            for logger in trainer.loggers:
                logger.log_metrics(logged, step=step)
        per_device = metrics.get(f"device{self.separator}items_per_sec")
        if per_device is not None and bar:
            # a host tensor: the progress bar never waits for the device
            pl_module.log("tokens/s", torch.tensor(float(per_device)), prog_bar=True,
                          logger=False, on_step=True, on_epoch=False, batch_size=1)

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._validation_start = time.perf_counter()

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # validation time is not training time
        if self._throughput is not None and not trainer.sanity_checking:
            self._t0 += time.perf_counter() - self._validation_start


def _logs(trainer: pl.Trainer, pl_module: pl.LightningModule, step: int) -> bool:
    """The model's logging steps when it defines them (``CausalLM.is_logging_step``), else
    every ``log_every_n_steps``-th step."""
    if hasattr(pl_module, "is_logging_step"):
        return pl_module.is_logging_step(step)
    n = trainer.log_every_n_steps
    return n > 0 and (step + 1) % n == 0
