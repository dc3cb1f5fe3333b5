"""Torch datasets over a store: the training stream of micro-batches drawn by a
``MixtureSchedule``, and fixed validation blocks per named set.

Both are ``IterableDataset``s that shard by data-parallel rank themselves, so Lightning never
injects a ``DistributedSampler``. The training stream starts at a given optimizer step: resume
is exact because every micro-batch is a pure function of its index.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from midtrain.data.mixture import (
    RAMP_CODES,
    MixtureSchedule,
    Phase,
    block_indices,
    domain_key,
    shift_phases,
)
from midtrain.data.store import Store, TokenSplit, num_items

if TYPE_CHECKING:
    import lightning as L


def read_blocks(
    split: TokenSplit,
    blocks: np.ndarray,
    seq_len: int,
    tokens_out: np.ndarray,
    mask_out: np.ndarray,
    stride: int | None = None,
) -> None:
    """Blocks of seq_len + 1 tokens (stride seq_len, or ``stride``: seq_len + 1 for the items of
    a sequential domain) into ``tokens_out``; the loss mask of their targets into ``mask_out``
    (ones where the split has no mask). One pread per block."""
    for row, block in enumerate(np.asarray(blocks, dtype=np.int64)):
        lo = int(block) * (stride or seq_len)
        tokens, mask = split.read(lo, lo + seq_len + 1)
        tokens_out[row] = tokens
        mask_out[row] = 1.0 if mask is None else mask[1:]


def to_batch(tokens: np.ndarray, mask: np.ndarray, domains: np.ndarray) -> dict[str, torch.Tensor]:
    x = torch.from_numpy(tokens)
    return {
        "input_ids": x[:, :-1],
        "targets": x[:, 1:],
        "loss_mask": torch.from_numpy(mask),
        "domain": torch.from_numpy(np.asarray(domains, dtype=np.int64)),
    }


@dataclass(frozen=True)
class BatchLayout:
    """Where one data-parallel rank's micro-batches sit in each optimizer step's global batch:
    slot ``(a * world_size + rank) * micro + i`` is sample i of accumulation micro-step a on
    ``rank``."""

    micro: int
    accumulation: int = 1
    rank: int = 0
    world_size: int = 1

    @classmethod
    def of(cls, trainer: L.Trainer, micro_batch_size: int) -> BatchLayout:
        """The layout of a trainer's fit: its gradient accumulation, rank and world size."""
        return cls(
            micro_batch_size, trainer.accumulate_grad_batches, trainer.global_rank,
            trainer.world_size,
        )  # fmt: skip


class StepStream(IterableDataset):
    """Micro-batches of one data-parallel rank, from optimizer step ``start_step`` on: the
    shared mechanism of exact resume. Every micro-batch is a pure function of its index.

    Global batch layout of optimizer step s: slot ``(a * world_size + rank) * micro + i`` is
    sample i of accumulation micro-step a on ``rank``. Worker w of W yields this rank's
    micro-batches w, w+W, ...; the DataLoader's round-robin restores the order. Subclasses
    implement ``micro_batch(index)``.
    """

    def __init__(self, layout: BatchLayout, start_step: int, max_steps: int) -> None:
        self.micro = layout.micro
        self.accumulation = layout.accumulation
        self.rank = layout.rank
        self.world_size = layout.world_size
        self.start_step = start_step
        self.max_steps = max_steps
        self.batch_size = layout.micro * layout.accumulation * layout.world_size

    def slots(self, index: int) -> tuple[int, int]:
        """(optimizer step, first slot of this rank's micro-batch within the global batch)."""
        step, a = divmod(index, self.accumulation)
        return step, (a * self.world_size + self.rank) * self.micro

    def micro_batch(self, index: int) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def __len__(self) -> int:
        # The whole run counts as one epoch; a resumed iterator yields only what is left, and
        # Lightning's restored batch counter accounts for the rest.
        return self.max_steps * self.accumulation

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        start = self.start_step * self.accumulation
        for index in range(start + worker, self.max_steps * self.accumulation, workers):
            yield self.micro_batch(index)


class MixtureStream(StepStream):
    """The pretraining stream: each slot's (domain, block) from a ``MixtureSchedule``.

    ``origin``: the optimizer step that is the schedule's step 0 (``--fork_data fresh``; the
    schedule is then ``shift_phases`` of the run's phases). 0 for every other run.
    ``sequential``: per domain, None (its blocks in a keyed permutation per epoch) or the item
    its draw 0 reads (``order: sequential``): draw n reads item ``(start + n) mod items``, so
    its sequences are consecutive items in slot order, step after step."""

    def __init__(
        self,
        splits: Sequence[TokenSplit],
        schedule: MixtureSchedule,
        seq_len: int,
        layout: BatchLayout,
        start_step: int,
        max_steps: int,
        phase_table: tuple[torch.Tensor, torch.Tensor] | None = None,
        origin: int = 0,
        sequential: Sequence[int | None] | None = None,
    ) -> None:
        super().__init__(layout, start_step, max_steps)
        self.origin = origin
        self.splits = list(splits)
        self.schedule = schedule
        self.seq_len = seq_len
        self.sequential = list(sequential or [None] * len(self.splits))
        self.num_blocks = [
            s.num_blocks(seq_len) if start is None else num_items(s, seq_len)
            for s, start in zip(self.splits, self.sequential, strict=True)
        ]
        # Shared-memory phases (start step, ramp steps, ramp code (RAMP_CODES), weight per
        # domain) and (phase count, version), written by the datamodule when the mixture changes
        # at runtime; workers rebuild their schedule when the version moves (a change that
        # replaces a phase at the same step keeps the count).
        self.phase_table = phase_table
        self._table_views: tuple[np.ndarray, np.ndarray] | None = None
        # the table holds the run's phases (before any shift), written before the stream
        self._version_seen = int(phase_table[1][1]) if phase_table is not None else 0
        assert schedule.batch_size == self.batch_size

    def micro_batch(self, index: int) -> dict[str, torch.Tensor]:
        """Micro-batch ``index`` (counted from step 0) of this rank."""
        step, lo = self.slots(index)
        step -= self.origin
        self._sync_phases()
        domain, draw = self.schedule.step(step)
        domain, draw = domain[lo : lo + self.micro], draw[lo : lo + self.micro]
        tokens = np.empty((self.micro, self.seq_len + 1), dtype=np.int64)
        mask = np.empty((self.micro, self.seq_len), dtype=np.float32)
        for d in np.unique(domain):
            sel = np.flatnonzero(domain == d)
            start = self.sequential[d]
            if start is None:
                blocks = block_indices(
                    draw[sel],
                    self.num_blocks[d],
                    self.schedule.seed,
                    domain_key(self.schedule.domains[d]),
                )
            else:  # file order: the next items, wrapping to item 0 past the end
                blocks = (start + draw[sel]) % self.num_blocks[d]
            t, m = tokens[sel], mask[sel]
            stride = None if start is None else self.seq_len + 1
            read_blocks(self.splits[d], blocks, self.seq_len, t, m, stride)
            tokens[sel], mask[sel] = t, m
        return to_batch(tokens, mask, domain)

    def _sync_phases(self) -> None:
        if self.phase_table is None:
            return
        if self._table_views is None:  # numpy views of the shared memory, made in the worker
            self._table_views = (self.phase_table[0].numpy(), self.phase_table[1].numpy())
        table, length = self._table_views
        version = int(length[1])
        if version == self._version_seen:
            return
        n = int(length[0])
        ramps = {code: name for name, code in RAMP_CODES.items()}
        phases = [
            Phase(
                int(r[0]),
                dict(zip(self.schedule.domains, r[3:], strict=True)),
                int(r[1]),
                ramps[int(r[2])],
            )
            for r in table[:n].tolist()
        ]
        s = self.schedule
        self.schedule = MixtureSchedule(
            s.domains, shift_phases(phases, self.origin), s.batch_size, s.seed
        )
        self._version_seen = version


def rank_share(n: int, rank: int, world_size: int) -> tuple[np.ndarray, int]:
    """Rank r's items of a validation set of n (r, r + world_size, ...), padded with item 0 to
    the same count on every rank, and how many are real: sharded models run the same
    collectives on every rank, and padding rows (loss mask zero) count nothing."""
    mine = np.arange(rank, n, world_size)
    rows = -(-n // world_size)
    return np.concatenate([mine, np.zeros(rows - len(mine), dtype=mine.dtype)]), len(mine)


class ValidationBlocks(IterableDataset):
    """Consecutive blocks of one validation split, identical across runs; this rank's share.

    The set is the first ``max_blocks`` blocks whatever the world size; rank r takes blocks
    r, r + world_size, ... Every rank yields the same number of rows (a short share is padded
    with rows whose loss mask is zero), so sharded models run the same collectives on every
    rank, and sums of losses and tokens over ranks are those of the whole set.
    """

    def __init__(
        self,
        split: TokenSplit,
        seq_len: int,
        batch_size: int,
        max_blocks: int | None,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        self.split = split
        self.seq_len = seq_len
        self.batch_size = batch_size
        n = split.num_blocks(seq_len)
        self.num_blocks = n if max_blocks is None else min(n, max_blocks)
        self.rank, self.world_size = rank, world_size
        self.rows = -(-self.num_blocks // world_size)  # per rank, padding included

    def __len__(self) -> int:
        return -(-self.rows // self.batch_size)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        mine, real = rank_share(self.num_blocks, self.rank, self.world_size)
        for lo in range(0, self.rows, self.batch_size):
            blocks = mine[lo : lo + self.batch_size]
            tokens = np.empty((len(blocks), self.seq_len + 1), dtype=np.int64)
            mask = np.empty((len(blocks), self.seq_len), dtype=np.float32)
            read_blocks(self.split, blocks, self.seq_len, tokens, mask)
            mask[max(real - lo, 0) :] = 0.0  # padding rows count nothing
            yield to_batch(tokens, mask, np.zeros(len(blocks), dtype=np.int64))


def validation_blocks(
    store: Store,
    names: Sequence[str],
    seq_len: int,
    batch_size: int,
    max_blocks: int | None,
    rank: int,
    world_size: int,
) -> list[ValidationBlocks]:
    """``ValidationBlocks`` of each named domain's validation split, in order."""
    return [
        ValidationBlocks(store.domain(n).val, seq_len, batch_size, max_blocks, rank, world_size)
        for n in names
    ]
