"""Callbacks users put in ``trainer.callbacks`` (or that the CLI adds by default)."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback, ThroughputMonitor
from lightning.pytorch.callbacks import ModelCheckpoint as _LightningModelCheckpoint
from lightning.pytorch.utilities import rank_zero_info

from midtrain.errors import MidtrainError
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
    world size, because the data module folds every switch into its schedule before training
    starts (a switch applied from a hook would reach the model late: the loader runs ahead).

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


def _sequences(batch: dict) -> int:
    return int(batch["input_ids"].shape[0])


def _tokens(batch: dict) -> int:
    return int(batch["input_ids"].numel())


class Throughput(ThroughputMonitor):
    """Lightning's ThroughputMonitor set up for token batches: logs (per device and in total)
    batches, sequences ("samples") and tokens ("items") per second, and, where the device's
    peak FLOP/s is known (GPUs), FLOP/s and MFU from ``CausalLM.flops_per_batch`` (the model's
    training FLOPs per token x tokens). Tokens/s also appears in the progress bar."""

    def __init__(self, window_size: int = 20, separator: str = "/") -> None:
        super().__init__(batch_size_fn=_sequences, length_fn=_tokens, window_size=window_size,
                         separator=separator)

    def _compute(self, trainer: pl.Trainer, iter_num: int | None = None) -> None:
        super()._compute(trainer, iter_num)
        stage = trainer.state.stage
        if stage is None or stage not in self._throughputs or not trainer.training:
            return
        metrics = self._throughputs[stage].compute()
        per_device = metrics.get(f"device{self._throughputs[stage].separator}items_per_sec")
        if per_device is not None:
            trainer.lightning_module.log("tokens/s", float(per_device), prog_bar=True,
                                         logger=False, on_step=True, on_epoch=False)
