"""How a run relates to the checkpoint it started from: a fork's record, the start of an
anneal, the rewrite of the checkpoint's optimizer state for the branch, and the learning-rate
schedule's settings that follow from them. ``CausalLM`` keeps one ``Branch``; the plan of the
running command (``midtrain.checkpoint.plan``) says whether it forks, resumes or evaluates."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from midtrain.checkpoint.plan import RunPlan
from midtrain.errors import MidtrainError
from midtrain.train.optim import ANNEALS, adamw_settings, lr_at, warmup_steps


def checkpoint_lr(checkpoint: Mapping[str, Any], where: str) -> float:
    """The learning rate a checkpoint was running at: that of the update it would make next
    (its optimizer's first parameter group, as its LR scheduler last set it)."""
    try:
        return float(checkpoint["optimizer_states"][0]["param_groups"][0]["lr"])
    except (KeyError, IndexError, TypeError):
        raise MidtrainError(
            f"{where}: the checkpoint holds no optimizer state (saved weights only?), so an "
            "anneal has no learning rate to start from; fork from a full checkpoint, or set "
            "model.lr_schedule to a schedule that starts from model.lr"
        ) from None


def fork_optimizer_state(
    checkpoint: dict[str, Any], lr_now: float, settings: Mapping[str, Any], reset: bool
) -> None:
    """Give a checkpoint's optimizer and LR-scheduler state the branch's AdamW ``settings``
    (``adamw_settings``; the checkpoint's would otherwise win silently), at ``lr_now``, the
    branch schedule's LR at the fork step. With ``reset`` the per-parameter state (AdamW's
    step count and moments) is dropped: the fork starts it afresh, as a new optimizer would."""
    peak = settings["lr"]
    for opt in checkpoint.get("optimizer_states", []):
        if reset:
            opt["state"] = {}
        for i, group in enumerate(opt.get("param_groups", [])):
            # groups as midtrain.train.optim.param_groups makes them: decayed first, then not
            group.update({k: v for k, v in settings.items() if k not in ("lr", "weight_decay")})
            group.update(
                lr=lr_now,
                initial_lr=peak,
                weight_decay=settings["weight_decay"] if i == 0 else 0.0,
            )
    for sched in checkpoint.get("lr_schedulers", []):
        if "base_lrs" in sched:
            sched["base_lrs"] = [peak] * len(sched["base_lrs"])
            sched["_last_lr"] = [lr_now] * len(sched["base_lrs"])


@dataclass
class Branch:
    """``fork``: how the run started from a checkpoint (``{"step", "optimizer", "data"}``, the
    ``fork`` of its run record); ``anneal``: where an anneal starts (``{"step", "lr"}``: the
    fork step and the checkpoint's LR). Both are kept in every checkpoint of the branch."""

    fork: dict[str, Any] | None = None
    anneal: dict[str, Any] | None = None

    def restore(
        self, plan: RunPlan, checkpoint: dict[str, Any], hparams: Mapping[str, Any]
    ) -> None:
        """Take the checkpoint a fit starts from: a fork's start (and the rewrite of its
        optimizer state), or a resumed branch's own record."""
        saved = checkpoint.get("midtrain", {})
        if plan.fork is None:  # a resume continues the run as it was started
            self.fork = (saved.get("run") or {}).get("fork")
            self.anneal = saved.get("anneal")
            return
        step = int(checkpoint.get("global_step", 0))
        self.fork = {**plan.fork.record(), "step": step}
        self.anneal = None
        if hparams["lr_schedule"] in ANNEALS:
            self.anneal = {"step": step, "lr": checkpoint_lr(checkpoint, plan.where)}

    def start_optimizer(
        self, plan: RunPlan, checkpoint: dict[str, Any], hparams: Mapping[str, Any], max_steps: int
    ) -> None:
        """A fork continues the checkpoint's optimizer state with the branch's settings."""
        if plan.fork is None:
            return
        step = int(checkpoint.get("global_step", 0))
        lr_now = lr_at(step, lr=hparams["lr"], **self.schedule(hparams, max_steps))
        settings = adamw_settings(hparams)
        fork_optimizer_state(checkpoint, lr_now, settings, reset=plan.fork.optimizer == "reset")

    def schedule(self, hparams: Mapping[str, Any], max_steps: int) -> dict[str, Any]:
        """``lr_at``'s settings for this run: an anneal starts at ``anneal`` (before a
        checkpoint is read under late-restoring strategies: at lr, rescheduled on load)."""
        name = hparams["lr_schedule"]
        anneal = name in ANNEALS
        start: Mapping[str, Any] = {"step": 0, "lr": hparams["lr"] if anneal else None}
        if anneal and self.anneal is not None:
            start = self.anneal
        warmup = hparams["warmup"] if not anneal or hparams.get("rewarm") else 0
        min_lr = hparams["min_lr"]
        offset = int(hparams.get("schedule_offset") or 0)  # a schedule continued (not anneals)
        return {
            "min_lr": min_lr if min_lr is not None else hparams["lr"] / 10,
            "warmup": warmup_steps(warmup, max_steps + offset - start["step"]),
            "max_steps": max_steps,
            "schedule": name,
            "decay_fraction": hparams["decay_fraction"],
            "origin": start["step"],
            "start_lr": start["lr"] if anneal else None,
            "offset": offset,
        }
