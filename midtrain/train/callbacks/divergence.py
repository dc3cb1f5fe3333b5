"""``DivergenceGuard``: a non-finite loss or gradient norm stops the run (never saving
non-finite weights), or with ``on_nonfinite: skip`` skips the step. See
docs/fault-tolerance.md."""

from __future__ import annotations

from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info

from midtrain.checkpoint.layout import LAST, checkpoint_dir
from midtrain.errors import MidtrainError
from midtrain.train.callbacks.base import StepCallback


class Diverged(MidtrainError):
    """A non-finite loss or gradient norm stopped training (exit code 3)."""

    exit_code = 3


class DivergenceGuard(StepCallback):
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

    def __init__(self, on_nonfinite: Literal["stop", "skip"] = "stop", max_skips: int = 10) -> None:
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

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
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
            rank_zero_info(
                f"divergence guard: skipped optimizer step {trainer.global_step} "
                f"(gradient norm {float(norm)}); {self.skipped} skipped so far"
            )
        pl_module.log(
            "train/skipped_steps", float(self.skipped), on_step=True, on_epoch=False, batch_size=1
        )
        if self.skipped_in_a_row >= self.max_skips:
            raise Diverged(
                f"divergence: {self.skipped_in_a_row} optimizer steps in a row had a non-finite "
                f"gradient norm (last at step {trainer.global_step}; divergence.max_skips "
                f"{self.max_skips}); {self._last_good(trainer)}"
            )

    def on_micro_batch_end(
        self, trainer: pl.Trainer, pl_module: Any, outputs: Any, batch: Any, ended: bool
    ) -> None:
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if self.on_nonfinite == "stop" and isinstance(loss, torch.Tensor):
            self._record(loss, 0)
        if not ended:
            return
        if self._step is not None:
            self._step += 1
        every = trainer.log_every_n_steps  # type: ignore[attr-defined]  # set by Lightning, undeclared
        if trainer.global_step % max(every, 1) == 0:
            self.check(trainer)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.check(trainer)

    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        self.check(trainer)
        finite = [
            torch.isfinite(_local(t)).all()
            for t in checkpoint.get("state_dict", {}).values()
            if isinstance(t, torch.Tensor) and t.is_floating_point()
        ]
        bad = bool(finite) and not bool(torch.stack(finite).all())
        if trainer.world_size > 1:
            bad = trainer.strategy.reduce_boolean_decision(bad, all=False)
        if bad:
            raise Diverged(
                f"divergence: the weights at step {trainer.global_step} are not "
                f"finite; no checkpoint written; {self._last_good(trainer)}"
            )

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
        raise Diverged(
            f"divergence: non-finite {where}; training stopped; lower model.lr or "
            f"set divergence.on_nonfinite: skip; {self._last_good(trainer)}"
        )

    @staticmethod
    def _last_good(trainer: pl.Trainer) -> str:
        last = checkpoint_dir(trainer) / LAST
        return f"the last good checkpoint is {last}" if last.exists() else "no checkpoint kept"


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t
