"""Lightning's Trainer, with midtrain's units: validation cadence in optimizer steps, progress
in optimizer steps, count-or-fraction arguments parsed integer-first, one results table.

Lightning annotates ``limit_val_batches`` and friends as ``Union[float, int]``; jsonargparse tries
float first, so ``limit_val_batches: 1`` (one batch) became ``1.0`` (100% of batches). Declaring
them ``int | float`` keeps integers integers; ``0.5`` and ``1.0`` stay fractions.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.accelerators import CPUAccelerator
from lightning.pytorch.callbacks import ProgressBar, TQDMProgressBar
from lightning.pytorch.callbacks.progress.tqdm_progress import Tqdm, convert_inf
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.types import EVAL_DATALOADERS

from midtrain.checkpoint.files import check_checkpoint
from midtrain.run_state import Fork, RunPlan
from midtrain.train import preemption_signals
from midtrain.train._lightning import log_without_epoch
from midtrain.train.host import keep_freed_memory
from midtrain.train.summary_table import ModelSummary


class StepProgressBar(TQDMProgressBar):
    """The training bar counts optimizer steps of the whole run (``global_step/max_steps``), so
    a resumed run shows where it is, the total, and an ETA from the steps this process ran."""

    @property
    def total_train_batches(self) -> int | float:
        max_steps = self.trainer.max_steps
        return max_steps if max_steps is not None and max_steps > 0 else super().total_train_batches

    def init_train_tqdm(self) -> Tqdm:
        step = self.trainer.global_step
        # tqdm's rate and ETA count from `initial`: the steps a resumed run did not run here
        return Tqdm(
            desc=self.train_description,
            position=2 * self.process_position,
            disable=self.is_disabled,
            leave=True,
            dynamic_ncols=True,
            file=sys.stdout,
            smoothing=0,
            bar_format=self.BAR_FORMAT,
            total=convert_inf(self.total_train_batches),
            initial=step,
        )

    def on_train_epoch_start(self, trainer: pl.Trainer, *args: Any) -> None:
        super().on_train_epoch_start(trainer, *args)
        bar = self.train_progress_bar
        bar.initial = bar.n = trainer.global_step
        bar.refresh()

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any
    ) -> None:
        bar = self.train_progress_bar
        step = trainer.global_step
        if bar is None or bar.disable or step == bar.n:
            return
        if step % self.refresh_rate == 0 or step == bar.total:
            bar.n = step
            bar.set_postfix(self.get_metrics(trainer, pl_module))  # refreshes


class Trainer(pl.Trainer):
    """``pl.Trainer`` with two differences in meaning, both in optimizer steps:

    - an integer ``val_check_interval`` counts optimizer steps, whatever the gradient
      accumulation and world size (Lightning counts this process's micro-batches); an interval
      beyond ``max_steps`` validates once, at the end of the run (with one info line);
    - the training progress bar shows optimizer steps of the whole run (also after a resume).

    On the CPU it also keeps freed host memory in the process (``midtrain.train.host``).

    ``validate`` and ``test`` print one results table, one column per validation set.

    ``run_plan`` is what the running command does with a checkpoint
    (``midtrain.run_state.RunPlan``: a resume, a fork, an evaluation of live or averaged
    weights, e.g. ``RunPlan("validate", ckpt, weights="ema")`` before ``validate``); ``fork``
    starts a branch from a checkpoint. Without a plan, Lightning's own arguments say it
    (``fit(ckpt_path=...)`` resumes, ``validate(ckpt_path=...)`` evaluates the live weights).
    """

    run_plan: RunPlan | None = None

    def __init__(
        self,
        *,
        limit_train_batches: int | float | None = None,
        limit_val_batches: int | float | None = None,
        limit_test_batches: int | float | None = None,
        limit_predict_batches: int | float | None = None,
        val_check_interval: int | float | None = None,
        overfit_batches: int | float = 0.0,
        **kwargs: Any,
    ) -> None:
        self.val_check_steps = val_check_interval if isinstance(val_check_interval, int) else None
        if self.val_check_steps is not None:
            max_steps = kwargs.get("max_steps")
            if max_steps is not None and 0 < max_steps < self.val_check_steps:
                rank_zero_info(
                    f"trainer.val_check_interval: {self.val_check_steps} steps is "
                    f"beyond the run's {max_steps}; validating at the end of the run"
                )
                self.val_check_steps = max_steps
            accumulation = kwargs.get("accumulate_grad_batches", 1)
            # Lightning counts the micro-batches of this process: one optimizer step is
            # `accumulation` of them on every rank, whatever the world size.
            val_check_interval = self.val_check_steps * accumulation
        _clamp_log_interval(kwargs)
        if kwargs.get("enable_progress_bar", True) is not False:
            callbacks = kwargs.get("callbacks")
            callbacks = (
                []
                if callbacks is None
                else (list(callbacks) if isinstance(callbacks, (list, tuple)) else [callbacks])
            )
            if not any(isinstance(cb, ProgressBar) for cb in callbacks):
                kwargs["callbacks"] = [*callbacks, StepProgressBar()]
        _add_model_summary(kwargs)
        super().__init__(
            limit_train_batches=limit_train_batches,
            limit_val_batches=limit_val_batches,
            limit_test_batches=limit_test_batches,
            limit_predict_batches=limit_predict_batches,
            val_check_interval=val_check_interval,
            overfit_batches=overfit_batches,
            **kwargs,
        )
        if isinstance(self.accelerator, CPUAccelerator):
            # on the CPU, each step reuses the previous step's freed blocks (midtrain.train.host)
            keep_freed_memory()
        log_without_epoch(self)  # runs in optimizer steps: no flat `epoch` chart
        self.run_plan = None

    def fork(
        self,
        model: pl.LightningModule,
        datamodule: pl.LightningDataModule | None,
        ckpt_path: str | Path,
        optimizer: str = "keep",
        data: str = "keep",
    ) -> None:
        """``fit`` as a branch from the checkpoint ``ckpt_path`` (what ``midtrain fit --fork``
        does): its weights, its optimizer state (``optimizer="reset"``: a new optimizer's) and
        its data position (``data="fresh"``: this run's schedule as a new stream from the fork
        step), with this run's settings from the fork step on."""
        meta = check_checkpoint(ckpt_path, "fork")
        fork = Fork(int(meta["global_step"]), optimizer, data)
        self.run_plan = RunPlan("fit", str(ckpt_path), fork)
        try:
            self.fit(model, datamodule=datamodule, ckpt_path=ckpt_path)
        finally:
            self.run_plan = None

    # Lightning's own parameters up to ``verbose`` (so it is never given twice), the rest as given.
    def fit(self, *args: Any, **kwargs: Any) -> None:
        # From here on the run writes into its directory and may start more processes: a
        # preemption signal from now until training starts stops all ranks together, at a
        # point where nothing is half-written (the Preemption callback)
        preemption_signals.run_begins()
        super().fit(*args, **kwargs)

    def validate(
        self,
        model: pl.LightningModule | None = None,
        dataloaders: EVAL_DATALOADERS | pl.LightningDataModule | None = None,
        ckpt_path: str | Path | None = None,
        verbose: bool = True,
        *args: Any,
        **kwargs: Any,
    ) -> list[Mapping[str, float]]:
        """Lightning's ``validate``, its results printed as one table.

        Args:
            ckpt_path: ``"best"``, ``"last"`` or the path of a checkpoint to validate; ``None``:
                the model's current weights (or the best checkpoint of a previous ``fit``).
            verbose: print the results table (on rank 0).
        """
        results = super().validate(model, dataloaders, ckpt_path, False, *args, **kwargs)
        if verbose and self.is_global_zero:
            print(results_table(results))
        return results

    def test(
        self,
        model: pl.LightningModule | None = None,
        dataloaders: EVAL_DATALOADERS | pl.LightningDataModule | None = None,
        ckpt_path: str | Path | None = None,
        verbose: bool = True,
        *args: Any,
        **kwargs: Any,
    ) -> list[Mapping[str, float]]:
        """Lightning's ``test``, its results printed as one table.

        Args:
            ckpt_path: ``"best"``, ``"last"`` or the path of a checkpoint to test; ``None``:
                the model's current weights (or the best checkpoint of a previous ``fit``).
            verbose: print the results table (on rank 0).
        """
        results = super().test(model, dataloaders, ckpt_path, False, *args, **kwargs)
        if verbose and self.is_global_zero:
            print(results_table(results))
        return results


def _add_model_summary(kwargs: dict[str, Any]) -> None:
    """midtrain's model summary (FLOPs per token, not Lightning's zeros) unless the user gave
    one or turned it off."""
    if kwargs.get("enable_model_summary", True) is False:
        return
    callbacks = kwargs.get("callbacks")
    callbacks = (
        []
        if callbacks is None
        else (list(callbacks) if isinstance(callbacks, (list, tuple)) else [callbacks])
    )
    if not any(isinstance(cb, pl.callbacks.ModelSummary) for cb in callbacks):
        kwargs["callbacks"] = [*callbacks, ModelSummary()]


def _clamp_log_interval(kwargs: dict[str, Any]) -> None:
    """A ``log_every_n_steps`` beyond ``max_steps`` becomes ``max_steps``: the run then logs its
    last step (CausalLM does anyway), and Lightning's "fewer batches than the logging interval"
    warning, false for such a run, has no cause. Steps logged before the end do not change."""
    n = kwargs.get("log_every_n_steps")
    n = 50 if n is None else n  # Lightning's default
    max_steps = kwargs.get("max_steps")
    if isinstance(n, int) and isinstance(max_steps, int) and 0 < max_steps < n:
        kwargs["log_every_n_steps"] = max_steps


def results_table(results: Sequence[Mapping[str, float]]) -> str:
    """``<stage>/<set>/<metric>`` results as one table: a row per metric, a column per set.
    Lightning repeats every epoch-level metric in each dataloader's dict; they are merged."""
    merged: dict[str, float] = {}
    for r in results:
        merged.update(r)
    sets: dict[str, dict[str, float]] = {}
    other: dict[str, float] = {}
    for key, value in merged.items():
        parts = key.split("/")
        if len(parts) == 3:
            sets.setdefault(parts[1], {})[f"{parts[0]}/{parts[2]}"] = value
        else:
            other[key] = value
    metrics = list(dict.fromkeys(m for per_set in sets.values() for m in per_set))
    rows = [["", *sets]] + [
        [m, *(_fmt(per_set.get(m)) for per_set in sets.values())] for m in metrics
    ]
    rows += [[k, _fmt(v)] for k, v in other.items()]
    width = [max(len(r[i]) for r in rows if i < len(r)) for i in range(max(map(len, rows)))]
    lines = [
        "  ".join(c.rjust(width[i]) if i else c.ljust(width[i]) for i, c in enumerate(r))
        for r in rows
    ]
    return "\n".join(line.rstrip() for line in lines)


def _fmt(value: float | None) -> str:
    return "" if value is None else f"{value:.4f}"
