"""``Throughput``: tokens/s and, where the device's peak is known, MFU."""

from __future__ import annotations

import time
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.fabric.utilities.throughput import Throughput as FabricThroughput
from lightning.fabric.utilities.throughput import get_available_flops

from midtrain.train.callbacks.base import StepCallback

# compute dtype of a Trainer precision, for the device's peak FLOP/s (MFU)
_PRECISION_DTYPES = {
    "bf16-mixed": torch.bfloat16,
    "bf16-true": torch.bfloat16,
    "16-mixed": torch.float16,
    "16-true": torch.float16,
    "64-true": torch.float64,
}


class Throughput(StepCallback):
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
            world_size=trainer.world_size,
            window_size=self.window_size,
            separator=self.separator,
        )
        self._t0 = time.perf_counter()
        self._batches = self._samples = self._tokens = 0

    def on_micro_batch_end(
        self, trainer: pl.Trainer, pl_module: Any, outputs: Any, batch: Any, ended: bool
    ) -> None:
        if self._throughput is None or not trainer.is_global_zero:
            return
        stepped = ended
        step = trainer.global_step - 1 if stepped else None  # the optimizer step just taken
        logging = step is not None and _logs(trainer, pl_module, step)
        if logging and trainer.strategy.root_device.type == "cuda":
            torch.cuda.synchronize()  # the logged window ends at exact device time
        self._batches += 1
        self._samples += int(batch["input_ids"].shape[0])
        self._tokens += int(batch["input_ids"].numel())
        self._throughput.update(
            time=time.perf_counter() - self._t0,
            batches=self._batches,
            samples=self._samples,
            lengths=self._tokens,
            flops=getattr(pl_module, "flops_per_batch", None),
        )
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
            pl_module.log(
                "tokens/s",
                torch.tensor(float(per_device)),
                prog_bar=True,
                logger=False,
                on_step=True,
                on_epoch=False,
                batch_size=1,
            )

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._validation_start = time.perf_counter()

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # validation time is not training time
        if self._throughput is not None and not trainer.sanity_checking:
            self._t0 += time.perf_counter() - self._validation_start


def _logs(trainer: pl.Trainer, pl_module: pl.LightningModule, step: int) -> bool:
    """The model's logging steps when it defines them (``CausalLM.is_logging_step``), else
    every ``log_every_n_steps``-th step."""
    is_logging_step = getattr(pl_module, "is_logging_step", None)
    if is_logging_step is not None:
        return bool(is_logging_step(step))
    n = trainer.log_every_n_steps  # type: ignore[attr-defined]  # set by Lightning, undeclared
    return n > 0 and (step + 1) % n == 0
