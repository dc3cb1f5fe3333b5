"""Optimizer parameter groups and learning-rate schedules, in optimizer steps."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from functools import partial
from typing import Any

import torch
from torch import nn

from midtrain.errors import MidtrainError


def warmup_steps(warmup: float, max_steps: int) -> int:
    """``warmup`` < 1 is a fraction of max_steps; otherwise a step count."""
    if warmup < 0:
        raise MidtrainError(f"model.warmup: must be >= 0, got {warmup}")
    return int(round(warmup * max_steps)) if warmup < 1 else int(warmup)


# -- LR schedules after warmup: (step, lr, min_lr, warmup, max_steps, decay_fraction) -> lr ---


def cosine(
    step: int, lr: float, min_lr: float, warmup: int, max_steps: int, decay_fraction: float
) -> float:
    """Cosine from lr to min_lr at max_steps."""
    progress = min(1.0, (step - warmup) / max(1, max_steps - warmup))
    return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * progress))


def wsd(
    step: int, lr: float, min_lr: float, warmup: int, max_steps: int, decay_fraction: float
) -> float:
    """Warmup-stable-decay: lr, then linear decay to min_lr over the last decay_fraction."""
    decay_start = max_steps - int(round(decay_fraction * max_steps))
    if step < decay_start:
        return lr
    progress = min(1.0, (step - decay_start) / max(1, max_steps - decay_start))
    return lr + (min_lr - lr) * progress


def constant(
    step: int, lr: float, min_lr: float, warmup: int, max_steps: int, decay_fraction: float
) -> float:
    """lr after warmup."""
    return lr


def _to_last_step(step: int, start: int, lr: float, min_lr: float, max_steps: int) -> float:
    """Linear from lr at ``start`` to exactly min_lr at the last step (max_steps - 1)."""
    progress = min(1.0, (step - start) / max(1, max_steps - 1 - start))
    return lr + (min_lr - lr) * progress


def anneal(
    step: int, lr: float, min_lr: float, warmup: int, max_steps: int, decay_fraction: float
) -> float:
    """Linear decay from lr to min_lr over every step after warmup (OLMo 2's stage 2). Steps
    count from the fork step and lr is the checkpoint's (``lr_at`` shifts them)."""
    return _to_last_step(step, warmup, lr, min_lr, max_steps)


def anneal_wsd(
    step: int, lr: float, min_lr: float, warmup: int, max_steps: int, decay_fraction: float
) -> float:
    """WSD's shape from the fork step: hold lr, then decay linearly to min_lr over the last
    decay_fraction of the steps after the fork."""
    decay_start = max(warmup, max_steps - int(round(decay_fraction * max_steps)))
    return lr if step < decay_start else _to_last_step(step, decay_start, lr, min_lr, max_steps)


SCHEDULES: dict[str, Callable[[int, float, float, int, int, float], float]] = {
    "cosine": cosine,
    "wsd": wsd,
    "constant": constant,
    "anneal": anneal,
    "anneal_wsd": anneal_wsd,
}
"""The LR-schedule table: ``model.lr_schedule`` names a key. A new schedule is one function
added here (warmup is applied before it)."""

ANNEALS = ("anneal", "anneal_wsd")
"""Schedules that start at a checkpoint: step 0 is the fork step, lr the LR the checkpoint was
running at, and warmup applies only when re-warming (``model.rewarm``)."""


def anneal_without_checkpoint(schedule: str) -> MidtrainError:
    """The one line for an anneal with no checkpoint LR to start from (a new run)."""
    return MidtrainError(
        f"model.lr_schedule: {schedule} starts at the learning rate of the checkpoint it forks "
        "from, and this run starts from none; add --fork <checkpoint>, or pick another schedule"
    )


def check_schedule(name: str) -> None:
    if name not in SCHEDULES:
        raise MidtrainError(
            f"model.lr_schedule: unknown {name!r}; use one of {', '.join(SCHEDULES)}"
        )


def lr_at(
    step: int,
    *,
    lr: float,
    min_lr: float,
    warmup: int,
    max_steps: int,
    schedule: str,
    decay_fraction: float = 0.2,
    origin: int = 0,
    start_lr: float | None = None,
    offset: int = 0,
) -> float:
    """Learning rate for the update made at optimizer step ``step`` (0-based): linear warmup
    over ``warmup`` steps, then ``SCHEDULES[schedule]``. An anneal (``ANNEALS``) runs from
    optimizer step ``origin`` (the fork step) at ``start_lr`` (the checkpoint's LR) instead of
    step 0 at ``lr``. ``offset`` continues another run's schedule: step ``s`` is that
    schedule's step ``offset + s``, which ends at ``offset + max_steps`` (a released
    checkpoint of step N continued on its own schedule: Pythia-160M's cosine from 6e-4 with
    1,430 warmup steps to 6e-5 at 143,000 is 1.738e-4 at offset 100,000)."""
    check_schedule(schedule)
    step, max_steps = step + offset, max_steps + offset
    if schedule in ANNEALS:
        if start_lr is None:
            raise anneal_without_checkpoint(schedule)
        # (steps before the fork are never trained; LambdaLR evaluates step 0 when built)
        step, max_steps, lr = max(0, step - origin), max_steps - origin, start_lr
    if step < warmup:
        return lr * (step + 1) / warmup
    return SCHEDULES[schedule](step, lr, min_lr, warmup, max_steps, decay_fraction)


def _factor(step: int, base_lr: float, **kwargs: Any) -> float:
    return lr_at(step, lr=base_lr, **kwargs) / base_lr


def lr_scheduler(
    optimizer: torch.optim.Optimizer, **kwargs: Any
) -> torch.optim.lr_scheduler.LambdaLR:
    """A LambdaLR over ``lr_at``. Its state is just the step, so resume continues the curve;
    a partial (not a closure) keeps LambdaLR from pickling stale settings into a fork."""
    base = optimizer.param_groups[0]["lr"]
    return torch.optim.lr_scheduler.LambdaLR(optimizer, partial(_factor, base_lr=base, **kwargs))


def reschedule(scheduler: object, base_lr: float, **kwargs: Any) -> None:
    """Give a built ``lr_scheduler`` new settings (an anneal's start, known only once its
    checkpoint is read: after ``configure_optimizers`` under strategies that restore late).
    Other schedulers (a user's own) are left alone."""
    if isinstance(scheduler, torch.optim.lr_scheduler.LambdaLR):
        factor = partial(_factor, base_lr=base_lr, **kwargs)
        scheduler.lr_lambdas = [factor] * len(scheduler.lr_lambdas)


def adamw_settings(hparams: Mapping[str, Any]) -> dict[str, Any]:
    """AdamW's settings from a ``CausalLM``'s hyperparameters: the one place an AdamW option
    is read, for building the optimizer and for giving a fork's optimizer state the branch's
    settings (``midtrain.train.branch.fork_optimizer_state``). ``weight_decay`` applies to the
    decayed parameter group only (``param_groups``)."""
    return {
        "lr": hparams["lr"],
        "betas": tuple(hparams["betas"]),
        "eps": hparams["eps"],
        "weight_decay": hparams["weight_decay"],
    }


def build_adamw(model: nn.Module, hparams: Mapping[str, Any]) -> torch.optim.AdamW:
    """AdamW over ``param_groups`` with ``adamw_settings``."""
    settings = adamw_settings(hparams)
    decay = settings.pop("weight_decay")
    return torch.optim.AdamW(
        param_groups(model, decay, hparams["decay_1d_params"]),
        **settings,
        fused=fused_adamw_supported(model),  # one kernel for all params
    )


def param_groups(model: nn.Module, weight_decay: float, decay_1d: bool = False) -> list[dict]:
    """Weight decay on matrices (embeddings and linear weights) only, unless ``decay_1d``."""
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 or decay_1d else no_decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def fused_adamw_supported(model: nn.Module) -> bool | None:
    """``fused=True`` for AdamW where torch has the fused kernel for the parameters' device:
    one pass over all parameters instead of a loop of small ops per parameter (on CPU the
    optimizer step gets several times faster). None (torch's default) elsewhere, and for
    DTensor parameters (FSDP2), which keep torch's default."""
    from torch.distributed.tensor import DTensor

    params = [p for p in model.parameters() if p.requires_grad]
    devices = {p.device.type for p in params}
    if len(devices) != 1 or not devices <= _FUSED_ADAMW_DEVICES:
        return None
    if any(isinstance(p, DTensor) for p in params):
        return None
    return True


# Device types with a fused AdamW kernel in torch >= 2.4 (CPU included).
_FUSED_ADAMW_DEVICES = {"cuda", "cpu", "xpu", "mps"}
