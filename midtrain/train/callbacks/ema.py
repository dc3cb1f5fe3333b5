"""``EMA``: an exponential moving average of the model's weights, kept beside the live weights
during ``fit``, saved in every checkpoint, resumed exactly, and validated as ``val_ema/<set>/*``
beside the live weights' ``val/<set>/*``.

Built on Lightning's ``EMAWeightAveraging`` (its update rule and schedule: ``should_update``),
with midtrain's choices where Lightning's differ:

- a checkpoint's ``state_dict`` stays the **live** weights (Lightning puts the average there),
  so a resume, a fork, ``init_from``, ``export`` and ``validate`` mean the same with or without
  the callback; the average is under ``checkpoint["ema"]`` (``midtrain.checkpoint.files``) and
  is read with ``--weights ema``;
- validation evaluates both weights (Lightning swaps in the average and validates only it);
- the module keeps its live weights after ``fit`` (Lightning copies the average over them);
- only the ``GPT`` is averaged (not the whole LightningModule with its data module).
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import EMAWeightAveraging
from lightning.pytorch.strategies import ModelParallelStrategy
from torch.optim.swa_utils import AveragedModel

from midtrain.checkpoint.files import EMA_KEY
from midtrain.errors import MidtrainError
from midtrain.model.gpt import GPT
from midtrain.run_state import RunPlan, Setting, plan_of
from midtrain.train._lightning import evaluation_log_step, publish_callback_metrics
from midtrain.train.callbacks.base import StepCallback

PREFIX = "val_ema"  # TensorBoard family of the averaged weights' validation


def _averaged_module(pl_module: pl.LightningModule) -> torch.nn.Module:
    """What is averaged: a CausalLM's GPT, else the whole module."""
    model = getattr(pl_module, "model", None)
    return model if isinstance(model, torch.nn.Module) else pl_module


def _prefix(pl_module: pl.LightningModule) -> str:
    """The averaged module's name in the LightningModule's state_dict."""
    return "model." if _averaged_module(pl_module) is not pl_module else ""


def _plain_copy(module: torch.nn.Module) -> torch.nn.Module:
    """A fresh ``GPT`` with ``module``'s weights: a deepcopy would carry the live model's
    compile and activation-checkpointing wrappers, which still point at the live model."""
    if not isinstance(module, GPT):
        return module  # AveragedModel deep-copies it
    with torch.device("meta"):  # no initialisation: it would draw from the global RNG
        copy = GPT(module.config)
    copy.to_empty(device=next(module.parameters()).device)
    copy.reset_buffers()
    copy.load_state_dict(module.state_dict())
    return copy


class EMA(StepCallback, EMAWeightAveraging):
    """An exponential moving average of the weights: after every ``update_every_n_steps``-th
    optimizer step from ``update_starting_at_step`` on (0-based step index),
    ``ema = decay * ema + (1 - decay) * live``; the first update copies the live weights.

    Args:
        decay: the weight of the old average, in (0, 1) (0.999: a horizon of ~1000 updates).
        update_every_n_steps, update_starting_at_step: when to update (Lightning's meaning).
        validate: also validate the averaged weights at every validation, as
            ``val_ema/<set>/{loss,ppl,bpb}``; each validation then costs twice as much.
        device: where the average lives (default: the model's device; ``cpu`` saves device
            memory at the price of a host transfer each update).

    Not with FSDP2 (``ModelParallelStrategy``): refused in one line.
    """

    def __init__(
        self,
        decay: float = 0.999,
        update_every_n_steps: int = 1,
        update_starting_at_step: int | None = None,
        validate: bool = True,
        device: str | None = None,
    ) -> None:
        if not 0.0 < decay < 1.0:
            raise MidtrainError(f"EMA.decay: must be in (0, 1), got {decay!r}")
        if update_every_n_steps < 1:
            raise MidtrainError(
                f"EMA.update_every_n_steps: must be >= 1, got {update_every_n_steps!r}"
            )
        super().__init__(
            device=device,
            use_buffers=False,  # rope tables are constants: copied, not averaged
            decay=decay,
            update_every_n_steps=update_every_n_steps,
            update_starting_at_step=update_starting_at_step,
        )
        self.decay = decay
        self.validate = validate

    # -- run state (midtrain.checkpoint.plan) -----------------------------------------------
    def run_settings(self, trainer: pl.Trainer) -> dict[str, Setting]:
        """What shaped the average: a resume keeps it (and may not drop the callback), a fork
        may change it (the average then starts afresh from the fork's weights)."""
        return {
            "EMA.decay": Setting(self.decay),
            "EMA.update_every_n_steps": Setting(self.update_every_n_steps),
            "EMA.update_starting_at_step": Setting(self.update_starting_at_step),
        }

    def check_plan(self, plan: RunPlan, trainer: pl.Trainer) -> None:
        """Refuse what the callback cannot do (the CLI asks before anything is written)."""
        if plan.command == "fit" and isinstance(trainer.strategy, ModelParallelStrategy):
            raise MidtrainError(
                "trainer.callbacks: midtrain.callbacks.EMA does not support FSDP2 "
                "(ModelParallelStrategy: the average would be a full unsharded copy on every "
                "rank); use DDP or one device, or remove the EMA callback"
            )

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        self.check_plan(plan_of(trainer), trainer)
        pl_module.configure_model()  # idempotent; the GPT must exist to be copied
        module = _averaged_module(pl_module)
        self._average_model = AveragedModel(
            _plain_copy(module), device=self._device, use_buffers=False, **self._kwargs
        )

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._device is None and self._average_model is not None:
            self._average_model.to(pl_module.device)  # setup ran before the model was moved

    # -- updates ----------------------------------------------------------------------------
    def _catch_up(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """The update for the optimizer step just taken, once: after it, and before any
        checkpoint is written (whatever the order of the callbacks writing checkpoints)."""
        step = trainer.global_step
        if self._average_model is None or step <= self._latest_update_step:
            return
        if self.should_update(step_idx=step - 1):
            self._average_model.update_parameters(_averaged_module(pl_module))
        self._latest_update_step = step

    def on_optimizer_step_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, step: int
    ) -> None:
        self._catch_up(trainer, pl_module)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        return None  # steps only: midtrain runs are in optimizer steps

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        return None  # the module keeps its live weights; the average is in the checkpoints

    # -- validation of the averaged weights -------------------------------------------------
    def on_validation_epoch_start(self, *args: Any) -> None:
        return None  # the live weights are validated first, as without the callback

    def on_validation_epoch_end(self, *args: Any) -> None:
        return None

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """After the live weights' validation: the same sets with the averaged weights, logged
        as ``val_ema/<set>/*`` at the same step (on every rank: the sums are reduced)."""
        if not self.validate or self._average_model is None or trainer.sanity_checking:
            return
        results = getattr(pl_module, "evaluation_results", None)
        loaders = trainer.val_dataloaders
        if results is None or loaders is None:
            return
        loaders = loaders if isinstance(loaders, (list, tuple)) else [loaders]
        self._swap(pl_module)
        try:
            with torch.no_grad():
                for index, loader in enumerate(loaders):
                    for batch_idx, batch in enumerate(loader):
                        batch = trainer.strategy.batch_to_device(batch, dataloader_idx=index)
                        pl_module.validation_step(batch, batch_idx, index)
            metrics = results(PREFIX)
        finally:
            self._swap(pl_module)
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=evaluation_log_step(trainer))
        publish_callback_metrics(trainer, metrics)

    @torch.no_grad()
    def _swap(self, pl_module: pl.LightningModule) -> None:
        """Exchange the live and the averaged weights (bitwise: swapping twice restores)."""
        assert self._average_model is not None
        average = self._average_model.module.parameters()
        live = _averaged_module(pl_module).parameters()
        for a, b in zip(average, live, strict=True):
            tmp = a.detach().clone()
            a.copy_(b.detach().to(a.device))
            b.copy_(tmp.to(b.device))

    # -- checkpoints ------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {}  # everything is in checkpoint["ema"], written after the catch-up update

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        return None

    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        if self._average_model is None:
            return  # outside fit
        self._catch_up(trainer, pl_module)
        prefix = _prefix(pl_module)
        checkpoint[EMA_KEY] = {
            # named as state_dict is, so a tool reads either the same way
            "state_dict": {
                prefix + k: v.detach().clone()
                for k, v in self._average_model.module.state_dict().items()
            },
            "n_averaged": int(self._average_model.n_averaged),
            "latest_update_step": self._latest_update_step,
            "decay": self.decay,
        }

    def on_load_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        """Resume (or fork) the average exactly; a checkpoint without one (a fork from a run
        without EMA) starts it at the next update, from the live weights. The planner
        (``midtrain.checkpoint.plan``) refused a resume that would change or drop it."""
        if self._average_model is None:
            return  # validate/test: the module reads the weights (the plan's `weights`)
        saved = checkpoint.get(EMA_KEY)
        if saved is None:
            self._latest_update_step = int(checkpoint.get("global_step", 0))
            return
        prefix = _prefix(pl_module)
        state = {k.removeprefix(prefix): v for k, v in saved["state_dict"].items()}
        self._average_model.module.load_state_dict(state)
        self._average_model.n_averaged.fill_(int(saved["n_averaged"]))
        self._latest_update_step = int(saved["latest_update_step"])
