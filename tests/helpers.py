"""Test-only callbacks, importable by `midtrain` subprocesses started from the repo root."""

from __future__ import annotations

import json
import os
import signal as signal_module
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch

from midtrain.train.trainer import Trainer

# The study tests' tiny model and a quiet one-device CPU trainer (the study tests and the proxy
# benchmark).
MODEL = {
    "arch": "tiny",
    "model_config": {"n_layer": 1, "n_embd": 32, "n_head": 2, "block_size": 64},
}
QUIET = {
    "accelerator": "cpu",
    "devices": 1,
    "enable_progress_bar": False,
    "enable_model_summary": False,
    "num_sanity_val_steps": 0,
    "log_every_n_steps": 1,
}


class RecordDomains(pl.Callback):
    """Writes the domain ids of every micro-batch the model trains on, with its step."""

    def __init__(self, path: str | None = None) -> None:
        self.path = path
        self.rows: list[tuple[int, list[int]]] = []

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self.rows.append((trainer.global_step, batch["domain"].tolist()))
        if self.path:
            with Path(self.path).open("a") as f:
                f.write(json.dumps(self.rows[-1]) + "\n")


class SlowDown(pl.Callback):
    """Sleeps after every batch so a test can kill the process mid-run."""

    def __init__(self, seconds: float = 0.1) -> None:
        self.seconds = seconds

    def on_train_batch_end(self, *args: Any) -> None:
        time.sleep(self.seconds)


class ChangeWeightsAt(pl.Callback):
    """An adaptive-mixture stand-in: changes the weights once, at a given optimizer step."""

    def __init__(self, step: int, weights: dict[str, float], record_to: str | None = None) -> None:
        self.step, self.weights, self.record_to = step, weights, record_to
        self.effective: int | None = None

    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        if trainer.global_step == self.step and self.effective is None:
            self.effective = trainer.datamodule.change_weights(self.weights)
            if self.record_to:
                Path(self.record_to).write_text(str(self.effective))


class ChangeWeightsAtBatches(pl.Callback):
    """Changes the weights after given micro-batches (counted from the start of fit), so
    several changes can fall inside one optimizer step; ``effective`` lists their steps."""

    def __init__(self, changes: dict[int, dict[str, float]]) -> None:
        self.changes, self.seen = changes, 0
        self.effective: list[int] = []

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        if self.seen in self.changes:
            self.effective.append(trainer.datamodule.change_weights(self.changes[self.seen]))
        self.seen += 1


class SaveBatches(pl.Callback):
    """Saves every training micro-batch (a list of dicts of tensors) to ``path`` at train end."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.batches: list[dict] = []

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self.batches.append({k: v.detach().cpu().clone() for k, v in batch.items()})

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        import torch

        torch.save(self.batches, self.path)


class NaNGradientAt(pl.Callback):
    """A fault injector: makes one gradient NaN at the given optimizer steps (after backward)."""

    def __init__(self, steps: list[int]) -> None:
        self.steps = set(steps)

    def on_after_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.global_step in self.steps:
            next(p for p in pl_module.parameters() if p.grad is not None).grad.view(-1)[0] = float(
                "nan"
            )


def fit_or_fork(
    trainer: Trainer,
    model: pl.LightningModule,
    datamodule: pl.LightningDataModule,
    ckpt_path: str | None,
    fork_step: int | None,
    fork_optimizer: str = "keep",
    fork_data: str = "keep",
) -> None:
    """``trainer.fit``, or with ``fork_step`` a fork from ``ckpt_path`` (a checkpoint of that
    step): what ``midtrain fit --ckpt_path`` and ``midtrain fit --fork`` do."""
    if fork_step is None:
        trainer.fit(model, datamodule, ckpt_path=ckpt_path)
        return
    assert ckpt_path is not None
    assert torch.load(ckpt_path, weights_only=False)["global_step"] == fork_step
    trainer.fork(model, datamodule, ckpt_path, optimizer=fork_optimizer, data=fork_data)


class RecordValue(pl.Callback):
    """Writes the value it was given, an ``Any``-typed init arg, to ``path`` as JSON."""

    def __init__(self, path: str, value: Any = None) -> None:
        self.path, self.value = path, value

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        Path(self.path).write_text(json.dumps(self.value))


class SignalSelf(pl.Callback):
    """Sends a signal to its own process at one moment of a run's start: ``init`` (the callback
    is built while the command reads its config), ``setup`` (Lightning sets the run up: the
    processes exist, the run directory is not written yet), ``on_fit_start`` (config.yaml,
    hparams and events written, training not started) or ``sanity_check`` (in the sanity
    check's first batch); ``rank``: only on that global rank."""

    def __init__(self, signal: str, at: str, rank: int | None = None) -> None:
        self.signal, self.at, self.rank = signal, at, rank
        if at == "init":
            self._send(None)

    def _send(self, trainer: pl.Trainer | None) -> None:
        if self.rank is None or trainer is None or trainer.global_rank == self.rank:
            os.kill(os.getpid(), getattr(signal_module, self.signal))

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self.at == "setup":
            self._send(trainer)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.at == "on_fit_start":
            self._send(trainer)

    def on_validation_batch_start(self, trainer: pl.Trainer, *args: Any) -> None:
        if self.at == "sanity_check" and trainer.sanity_checking and args[-1] == 0:
            self._send(trainer)
