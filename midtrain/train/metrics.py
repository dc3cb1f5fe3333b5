"""Training metrics that stay on the device between logging steps.

``DomainSums`` holds the per-domain sums of one optimizer step (or a window of steps) as named
tensors, entry 0 for the whole batch and 1 + i for domain i. Nothing here leaves the device:
the ``CausalLM`` reduces and transfers them once, on logging steps only (``is_logging_step``).
A new per-domain metric is one field here plus its line in ``CausalLM._log_train_step``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import torch


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
