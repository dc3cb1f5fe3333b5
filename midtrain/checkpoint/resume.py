"""What a resume starts from and must agree with: which checkpoint ``--ckpt_path last``
means, the run record every checkpoint carries (what shaped its data stream and
optimisation, by config key), and the differences a resume or a fork would silently make."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning.pytorch as pl

from midtrain.checkpoint.files import check_checkpoint, loadable, run_checkpoints_in
from midtrain.checkpoint.layout import LAST
from midtrain.data.contract import StepDataModule
from midtrain.errors import MidtrainError


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
    say(
        f"midtrain: resuming from {path} (optimizer step {step}), the newest loadable checkpoint "
        f"of {directory}"
    )
    return path


# How the global batch is split is recorded but may change on resume (e.g. 2 processes -> 1
# with twice the micro batch): the data stream is the same; the sums differ in rounding only.
ELASTIC_KEYS = ("data.micro_batch_size", "trainer.accumulate_grad_batches", "world size")


# What a run's start did (``--fork`` and its options): recorded, carried by resumes, never a
# difference (a resume states it only through ``--fork_*``, checked by ``check_fork_options``).
RECORD_ONLY_KEYS = ("fork",)


# Keys that shape what happened before the checkpoint: a fork cannot change them either.
PAST_KEYS = (
    "data.store",
    "data.seq_len",
    "data.max_length",
    "data.packing",
    "data.seed",
    "data.global_batch_size",
    "model.shape",
    "model.decay_1d_params",
)


def run_record(
    model: pl.LightningModule, datamodule: pl.LightningDataModule | None, trainer: pl.Trainer
) -> dict[str, Any]:
    """Everything that shapes a run's data stream and optimisation, by config key."""
    record: dict[str, Any] = {}
    if isinstance(datamodule, StepDataModule):
        # what the data module says its stream depends on (store, seq_len or max_length and
        # packing, seed); the mixture schedule is compared by its own load_state_dict
        for key, value in datamodule.fingerprint().items():
            if key != "phases":
                record[f"data.{key}"] = value
        micro = datamodule.micro_batch_size
        record.update(
            {
                "data.global_batch_size": micro
                * trainer.accumulate_grad_batches
                * trainer.world_size,
                "data.micro_batch_size": micro,
                "trainer.accumulate_grad_batches": trainer.accumulate_grad_batches,
                "world size": trainer.world_size,
            }
        )
    config = getattr(model, "config", None)
    if config is not None:
        record["model.shape"] = config.shape()
    hp = getattr(model, "hparams", {})
    for key in (
        "lr",
        "min_lr",
        "warmup",
        "lr_schedule",
        "decay_fraction",
        "weight_decay",
        "decay_1d_params",
        "eps",
        "rewarm",
    ):
        if key in hp:
            record[f"model.{key}"] = hp[key]
    if "betas" in hp:
        record["model.betas"] = [float(b) for b in hp["betas"]]
    record["trainer.max_steps"] = trainer.max_steps
    fork = getattr(model, "fork_record", None)
    if fork is not None:  # how the run started from a checkpoint (kept by its resumes)
        record["fork"] = dict(fork)
    return record


def _show(key: str, saved: Any, now: Any) -> str:
    if isinstance(saved, dict) and isinstance(now, dict):
        keys = [k for k in sorted(set(saved) | set(now)) if saved.get(k) != now.get(k)]
        return ", ".join(f"{key}.{k} {saved.get(k)!r} -> {now.get(k)!r}" for k in keys)
    return f"{key} {saved!r} -> {now!r}"


def resume_differences(saved: dict[str, Any], now: dict[str, Any], fork: bool) -> list[str]:
    """Differences between a checkpoint's run record and this run's, as ``key old -> new``:
    all of them for a resume; for a fork only those that change the past."""
    keys = [
        k
        for k in now
        if k in saved and saved[k] != now[k] and k not in ELASTIC_KEYS and k not in RECORD_ONLY_KEYS
    ]
    if fork:
        keys = [k for k in keys if k in PAST_KEYS]
    return [_show(k, saved[k], now[k]) for k in keys]


def refuse_differences(saved: dict[str, Any], now: dict[str, Any], fork: bool, where: str) -> None:
    """Refuse, in one line, a checkpoint this run cannot continue exactly (a resume) or a fork
    that would change the past. The one resume comparison: the CLI calls it before anything
    is written, ``CausalLM.on_load_checkpoint`` for runs started from Python."""
    diffs = resume_differences(saved, now, fork)
    if not diffs:
        return
    hint = (
        "a fork may change the optimizer settings, max_steps and the schedule from the fork "
        "step on, not the past"
        if fork
        else "resume with the checkpoint's settings, or start a new run from it with --fork"
    )
    raise MidtrainError(f"{where}: it was trained with another setup: {'; '.join(diffs)}; {hint}")


def check_fork_options(saved: dict[str, Any] | None, options: dict[str, str], where: str) -> None:
    """A resume given ``--fork_*`` options (a branch's saved config holds them): each must be
    what the run was forked with (``saved``, the ``fork`` of its run record)."""
    for key, value in options.items():
        was = (saved or {}).get(key.removeprefix("fork_"))
        if was is None:
            raise MidtrainError(
                f"{key}: {value} is an option of a fork, and {where} continues a run that was "
                f"not forked; drop --{key}, or start a new run from it with --fork"
            )
        if was != value:
            raise MidtrainError(
                f"{key}: {value}, but {where} continues a run forked with {key} {was}; a "
                f"resume continues its run as it was started: drop --{key}"
            )


@dataclass
class ResumePlan:
    """What ``--ckpt_path`` resolves to, read before anything is checked or written.

    ``error`` and ``lines`` are held back until the config's own checks have passed: the error
    is raised then, the lines (which checkpoint, which ones were skipped) said once training
    may write."""

    ckpt_path: str | None
    step: int | None = None  # the optimizer step of the checkpoint resumed from
    error: str | None = None
    lines: list[str] = field(default_factory=list)
    metadata: dict[str, dict[str, Any]] = field(default_factory=dict)  # per path, read once

    def checkpoint_metadata(self, path: str, what: str) -> dict[str, Any]:
        """A checkpoint's metadata (read once per path), or a one-line error naming it."""
        if str(path) not in self.metadata:
            self.metadata[str(path)] = check_checkpoint(path, what)
        return self.metadata[str(path)]


def plan_resume(ckpt_path: str | None, directory: Path, subcommand: str | None) -> ResumePlan:
    """Resolve ``last`` (the newest loadable checkpoint in ``directory``; an error when there is
    none) and ``last_or_new`` (the same, or a new run for ``fit``) to a file; read its metadata."""
    plan = ResumePlan(ckpt_path)
    if ckpt_path in ("last", "last_or_new"):
        found = resume_checkpoint(directory, plan.lines.append)
        if found is not None:
            plan.ckpt_path = str(found)
        elif ckpt_path == "last":
            plan.error = (
                f"ckpt_path: last: no checkpoint in {directory}; start without "
                "--ckpt_path, or use --ckpt_path last_or_new"
            )
        elif subcommand != "fit":
            plan.error = "ckpt_path: last_or_new is for fit only"
        else:
            plan.ckpt_path = None
            plan.lines.append(
                f"midtrain: NO CHECKPOINT in {directory}: starting a new run "
                "(--ckpt_path last_or_new)"
            )
    if plan.ckpt_path and Path(str(plan.ckpt_path)).exists():
        meta, _ = loadable(Path(str(plan.ckpt_path)))
        if meta is not None:
            plan.metadata[str(plan.ckpt_path)] = meta
            plan.step = int(meta["global_step"])
    return plan


def checkpoint_lr(checkpoint: dict[str, Any], where: str) -> float:
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
    checkpoint: dict[str, Any],
    lr_now: float,
    lr: float,
    betas: tuple[float, float],
    eps: float,
    weight_decay: float,
    reset: bool = False,
) -> None:
    """Rewrite a checkpoint's optimizer and LR-scheduler state for a fork, which continues the
    optimizer state with the new run's hyperparameters (the checkpoint's would otherwise win
    silently): ``lr_now`` is the new schedule's LR at the fork step, ``lr`` its peak. With
    ``reset`` the per-parameter state (AdamW's step count and moments) is dropped: the fork
    starts it afresh, as a new optimizer would."""
    for opt in checkpoint.get("optimizer_states", []):
        if reset:
            opt["state"] = {}
        for i, group in enumerate(opt.get("param_groups", [])):
            # groups as midtrain.train.optim.param_groups makes them: decayed first, then not
            group.update(
                lr=lr_now,
                initial_lr=lr,
                betas=tuple(betas),
                eps=eps,
                weight_decay=weight_decay if i == 0 else 0.0,
            )
    for sched in checkpoint.get("lr_schedulers", []):
        if "base_lrs" in sched:
            sched["base_lrs"] = [lr] * len(sched["base_lrs"])
            sched["_last_lr"] = [lr_now] * len(sched["base_lrs"])
