"""A run's metrics, in one home: ``train/*`` (``TrainingMetrics``), ``val/<set>/*``
(``validation_sums``, ``add_validation``, ``evaluation_results``), and when they are logged
(``is_logging_step``).

Training sums stay on the device between logging steps: ``DomainSums`` holds the per-domain
sums of one optimizer step as named tensors, entry 0 for the whole batch and 1 + i for domain
i; ``TrainingMetrics`` reduces and transfers them once, on logging steps only. A new
per-domain metric is one field of ``DomainSums`` plus its line in
``TrainingMetrics.step_metrics``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

import torch
from torchmetrics.aggregation import SumMetric

from midtrain.train._lightning import publish_callback_metrics

if TYPE_CHECKING:
    import lightning.pytorch as pl


@dataclass
class DomainSums:
    """Sums over the sequences of a step: index 0 = all, 1 + i = domain i."""

    loss: torch.Tensor  # summed token losses (nats)
    loss_tokens: torch.Tensor  # tokens counted in the loss (loss mask)
    tokens: torch.Tensor  # real input tokens (padding excluded)

    @classmethod
    def zeros(cls, num_domains: int, device: torch.device | str) -> DomainSums:
        return cls(
            *(
                torch.zeros(num_domains + 1, dtype=torch.float64, device=device)
                for _ in dataclasses.fields(cls)
            )
        )

    def add(
        self,
        losses: torch.Tensor,
        mask: torch.Tensor,
        real_tokens: torch.Tensor,
        domain: torch.Tensor | None,
    ) -> None:
        """Add a micro-batch: per-token ``losses`` and ``mask`` (B, T), ``real_tokens`` per
        sequence (B,), ``domain`` id per sequence (B,) or None without domains."""
        per_seq = torch.stack([losses.sum(1), mask.sum(1), real_tokens.to(mask.dtype)])
        for field, row in zip(dataclasses.fields(self), per_seq, strict=True):
            add_per_domain(getattr(self, field.name), row, domain)

    def stacked(self) -> torch.Tensor:
        """One (fields, 1 + domains) tensor: one collective and one transfer for all."""
        return torch.stack([getattr(self, f.name) for f in dataclasses.fields(self)])

    @classmethod
    def from_stacked(cls, stacked: torch.Tensor) -> DomainSums:
        return cls(*stacked)


def add_per_domain(
    total: torch.Tensor, per_sequence: torch.Tensor, domain: torch.Tensor | None
) -> None:
    """``total[0] +=`` the sum over sequences, ``total[1 + d] +=`` that of domain d's (in place,
    on the device)."""
    per_sequence = per_sequence.to(total.dtype)
    total[0] += per_sequence.sum()
    if domain is not None and total.numel() > 1:
        total[1:].index_add_(0, domain, per_sequence)


def is_logging_step(
    step: int, every_n_steps: int, max_steps: int, phase_starts: Sequence[int]
) -> bool:
    """Steps whose training metrics are logged: every ``every_n_steps``-th step (Lightning's
    ``log_every_n_steps``), the last step, and both sides of every mixture phase start, so
    per-domain curves start and stop exactly at a switch. A pure function of the step and the
    schedule: an uninterrupted, a resumed and a forked run log the same steps."""
    if every_n_steps <= 0:
        return False
    return (
        (step + 1) % every_n_steps == 0
        or step + 1 == max_steps
        or any(step in (s - 1, s) for s in phase_starts)
    )


class TrainingMetrics:
    """The ``train/*`` values of a run: per-step sums on the device, reduced over ranks,
    transferred and logged on logging steps only, and published to
    ``trainer.callback_metrics`` (for callbacks and ``ModelCheckpoint(monitor=...)``).

    ``tokens_seen`` (global tokens per domain, up to the last flush) and the values published
    after the last step are checkpoint state (``state``/``restore``): a resumed run logs and
    publishes exactly what an uninterrupted one would."""

    def __init__(self) -> None:
        self.domains: list[str] = []
        self.tokens_seen: dict[str, int] = {}
        self._step_sums: DomainSums | None = None  # this step, this rank
        self._sums_step: int | None = None  # the optimizer step _step_sums belong to
        self._tokens_pending: torch.Tensor | None = None  # since the last flush, this rank
        self._grad_norm: torch.Tensor | None = None  # on logging steps only
        self._lr: float | None = None  # the LR of this step's update (before the scheduler steps)
        # train/* values published to callback_metrics, and those of a logging step computed
        # early for a checkpoint (step, metrics); a resume publishes the restored ones again
        self.published: dict[str, float] = {}
        self._early: tuple[int, dict[str, float]] | None = None
        self._restored: dict[str, float] | None = None

    def connect(self, domains: Sequence[str]) -> None:
        self.domains = list(domains)
        for d in self.domains:
            self.tokens_seen.setdefault(d, 0)

    def add(
        self, step: int, batch: Mapping[str, torch.Tensor], losses: torch.Tensor, mask: torch.Tensor
    ) -> None:
        """Add a micro-batch of optimizer step ``step`` (on the device)."""
        n = len(self.domains)
        if self._step_sums is None:
            self._step_sums = DomainSums.zeros(n, losses.device)
            self._sums_step = step
        if self._tokens_pending is None:
            self._tokens_pending = torch.zeros(n + 1, dtype=torch.float64, device=losses.device)
        # real (non-padding) input tokens per sequence; every token for pretraining blocks
        real = batch["tokens"] if "tokens" in batch else torch.full_like(mask[:, 0], mask.shape[1])
        domain = batch["domain"] if n else None
        self._step_sums.add(losses, mask, real, domain)
        add_per_domain(self._tokens_pending, real, domain)

    def before_optimizer_step(self, optimizer: torch.optim.Optimizer, params: Any) -> None:
        """On a logging step, before the update: the LR it uses and the gradient norm (a pass
        over every gradient: only when it is logged)."""
        self._lr = float(optimizer.param_groups[0]["lr"])
        grads = [p.grad for p in params if p.grad is not None]
        if grads:
            self._grad_norm = torch.nn.utils.get_total_norm(grads)

    def step_done(self) -> None:
        """The optimizer step's sums are logged (or not a logging step): start the next."""
        self._step_sums = None

    def flush_tokens(self, trainer: pl.Trainer) -> None:
        """Add this step's pending token counts of every rank to ``tokens_seen`` (a collective
        and one transfer: on logging steps and before a checkpoint is written)."""
        if self._tokens_pending is None:
            return
        pending = trainer.strategy.reduce(self._tokens_pending, reduce_op="sum")
        self._tokens_pending = None
        for d, n in zip(self.domains, pending[1:].tolist(), strict=True):
            self.tokens_seen[d] += int(n)

    def step_metrics(self, trainer: pl.Trainer, step: int) -> dict[str, float]:
        """The metrics of logging step ``step``: ``train/loss``, and per domain
        ``train/loss/<d>`` and ``train/tokens/<d>`` only if the domain had tokens in this step
        (no stale values). Collectives and one transfer; computed once (a checkpoint written
        before the step is logged asks first, ``after_step``)."""
        if self._early is not None and self._early[0] == step:
            return self._early[1]
        assert self._step_sums is not None  # this step's training_step set them
        sums = DomainSums.from_stacked(
            trainer.strategy.reduce(self._step_sums.stacked(), reduce_op="sum").cpu()
        )
        self.flush_tokens(trainer)
        metrics = {"train/loss": float(sums.loss[0] / sums.loss_tokens[0].clamp_min(1))}
        for i, d in enumerate(self.domains, start=1):
            if sums.tokens[i] > 0:
                metrics[f"train/tokens/{d}"] = float(self.tokens_seen[d])
            if sums.loss_tokens[i] > 0:
                metrics[f"train/loss/{d}"] = float(sums.loss[i] / sums.loss_tokens[i])
        metrics["train/tokens"] = float(sum(self.tokens_seen.values()))
        if self._lr is not None:
            metrics["train/lr"] = self._lr
        if self._grad_norm is not None:
            norm = self._grad_norm
            norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm  # FSDP2 DTensor
            metrics["train/grad_norm"] = float(norm)
            self._grad_norm = None
        self._early = (step, metrics)
        return metrics

    def log_step(self, trainer: pl.Trainer, step: int) -> dict[str, float]:
        """Log logging step ``step`` to every logger and publish it to ``callback_metrics``
        (not through ``LightningModule.log``: its result collection costs ~0.8 ms a key)."""
        metrics = self.step_metrics(trainer, step)
        self._early = None
        self.published.update(metrics)
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)
        publish_callback_metrics(trainer, metrics)
        return metrics

    def after_step(self, trainer: pl.Trainer, step: int, logging: bool) -> dict[str, float]:
        """The train/* values ``callback_metrics`` holds once optimizer step ``step`` is done.
        A checkpoint is written (in a callback's ``on_train_batch_end``) before the step is
        logged: a logging step's metrics are computed now, on every rank (every rank saves),
        and logged from the same values afterwards."""
        metrics = dict(self.published)
        complete = self._step_sums is not None and self._sums_step == step
        if trainer.training and complete and logging:
            metrics.update(self.step_metrics(trainer, step))
        return metrics

    def state(self, trainer: pl.Trainer | None, step: int, logging: bool) -> dict[str, Any]:
        """What a checkpoint keeps: the token counts (every rank flushes: they include the last
        step) and the callback metrics after ``step``."""
        if trainer is None:
            return {"tokens_seen": dict(self.tokens_seen), "callback_metrics": dict(self.published)}
        self.flush_tokens(trainer)
        return {
            "tokens_seen": dict(self.tokens_seen),
            "callback_metrics": self.after_step(trainer, step, logging),
        }

    def restore(self, saved: Mapping[str, Any]) -> None:
        self.tokens_seen.update(saved.get("tokens_seen", {}))
        self._restored = dict(saved.get("callback_metrics", {}))

    def publish_restored(self, trainer: pl.Trainer) -> None:
        """A resumed run starts with the callback metrics the interrupted run held after the
        checkpoint's step: callbacks that decide from them (AdaptiveMixture) decide alike."""
        if self._restored:
            publish_callback_metrics(trainer, self._restored)
            self.published = dict(self._restored)
        self._restored = None


# -- validation: sums per set, as torchmetrics (reduced over ranks at compute) -------------------

VALIDATION_SUMS = ("loss", "tokens", "bytes")


def validation_sums() -> torch.nn.ModuleDict:
    """One validation set's sums. ``nan_strategy="disable"``: a NaN loss stays NaN (the
    default drops it, and a diverged model would report loss 0)."""
    return torch.nn.ModuleDict({k: SumMetric(nan_strategy="disable") for k in VALIDATION_SUMS})


def _sums(metrics: torch.nn.Module) -> Mapping[str, SumMetric]:
    """A set's sums (a ModuleDict types its items as plain modules)."""
    return cast("Mapping[str, SumMetric]", metrics)


def add_validation(
    sums: torch.nn.Module, losses: torch.Tensor, mask: torch.Tensor, bytes_per_token: float | None
) -> None:
    """Add a validation micro-batch to a set's sums."""
    metrics = _sums(sums)
    metrics["loss"].update(losses.sum().double())
    metrics["tokens"].update(mask.sum().double())
    if bytes_per_token is not None:
        # estimated from the split's average UTF-8 bytes per token
        metrics["bytes"].update(mask.sum().double() * bytes_per_token)


def evaluation_results(sets: torch.nn.ModuleDict, prefix: str) -> dict[str, float]:
    """``<prefix>/<set>/{loss,ppl,bpb}`` of what was added since the last call (reduced over
    ranks), and reset the sums. A NaN loss stays NaN (never a number)."""
    results: dict[str, float] = {}
    for name, module in sets.items():
        metrics = _sums(module)
        tokens = metrics["tokens"].compute()
        if tokens > 0:
            loss = (metrics["loss"].compute() / tokens).item()
            results[f"{prefix}/{name}/loss"] = loss
            ppl = math.exp(min(loss, 50.0)) if math.isfinite(loss) else math.nan
            results[f"{prefix}/{name}/ppl"] = ppl
            nbytes = metrics["bytes"].compute()
            if nbytes > 0:  # bits per UTF-8 byte: comparable across tokenizers
                bpb = (metrics["loss"].compute() / math.log(2) / nbytes).item()
                results[f"{prefix}/{name}/bpb"] = bpb
        for m in metrics.values():
            m.reset()
    return results
