"""``SFTDataModule``: supervised fine-tuning on whole examples of a prepared domain.

An SFT set is prepared like any domain (``midtrain prepare`` with ``prompt``/``response``
templates; ``mask_prompt`` decides whether prompt tokens count in the loss), with the tokenizer
the model was pretrained with. Each example is one document of the store, EOS included.

Training order is a seeded permutation of the examples per epoch, a pure function of the
sample index like the pretraining mixture, so resume is exact. Rows are either one example
right-padded to the longest in its micro-batch, or (``packing``) several whole examples packed
greedily into ``max_length`` tokens, with document ids so attention never crosses examples.
Every validation evaluates the in-domain validation split and the general corpus' sets, so
forgetting is logged as ``val/<general>/loss`` next to ``val/<target>/loss``.
"""

from __future__ import annotations

from collections.abc import Iterator
from functools import lru_cache
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import IterableDataset

from midtrain.data.contract import StepDataModule
from midtrain.data.mixture import domain_key, permute
from midtrain.data.store import Store, TokenSplit
from midtrain.data.streams import BatchLayout, StepStream, rank_share, validation_blocks
from midtrain.errors import MidtrainError

PAD_DOC = -1  # doc id of padding positions: they attend only to each other


def example_rows(
    lengths: np.ndarray, max_tokens: int, packing: bool, seed: int, epoch: int, key: int
) -> list[np.ndarray]:
    """Rows of one epoch: example ids in a seeded order, one per row or packed greedily."""
    n = len(lengths)
    order = permute(np.arange(n), n, key=(key * 1_000_003 + seed * 7919 + epoch) & (2**63 - 1))
    if not packing:
        return [order[i : i + 1] for i in range(n)]
    rows: list[np.ndarray] = []
    current: list[int] = []
    used = 0
    for i in order:
        size = min(int(lengths[i]), max_tokens)
        if current and used + size > max_tokens:
            rows.append(np.asarray(current))
            current, used = [], 0
        current.append(i)
        used += size
    rows.append(np.asarray(current))
    return rows


def build_row(
    split: TokenSplit, examples: np.ndarray, max_tokens: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(tokens, target mask, doc ids) of a row; each example truncated to ``max_tokens``.
    The mask is aligned with tokens: mask[t] says whether token t counts as a target."""
    tokens, mask, docs = [], [], []
    for j, e in enumerate(examples):
        lo, hi = int(split.doc_offsets[e]), int(split.doc_offsets[e + 1])
        hi = min(hi, lo + max_tokens)
        raw, raw_mask = split.read(lo, hi)
        t = raw.astype(np.int64)
        m = (
            raw_mask.astype(np.float32)
            if raw_mask is not None
            else np.ones(hi - lo, dtype=np.float32)
        )
        m[0] = 0.0  # an example's first token is never predicted from the one before it
        tokens.append(t)
        mask.append(m)
        docs.append(np.full(hi - lo, j, dtype=np.int64))
    return np.concatenate(tokens), np.concatenate(mask), np.concatenate(docs)


def collate_rows(
    rows: list[tuple[np.ndarray, np.ndarray, np.ndarray]], pad_id: int, domain: int, packed: bool
) -> dict[str, torch.Tensor]:
    """Right-pad rows to the longest; inputs/targets shifted by one."""
    width = max(len(t) for t, _, _ in rows)
    tokens = np.full((len(rows), width), pad_id, dtype=np.int64)
    mask = np.zeros((len(rows), width), dtype=np.float32)
    docs = np.full((len(rows), width), PAD_DOC, dtype=np.int64)
    for r, (t, m, d) in enumerate(rows):
        tokens[r, : len(t)], mask[r, : len(m)], docs[r, : len(d)] = t, m, d
    batch = {
        "input_ids": torch.from_numpy(tokens[:, :-1]),
        "targets": torch.from_numpy(tokens[:, 1:]),
        "loss_mask": torch.from_numpy(mask[:, 1:]),
        "domain": torch.full((len(rows),), domain, dtype=torch.long),
        "tokens": torch.tensor([min(len(t), width - 1) for t, _, _ in rows], dtype=torch.long),
    }
    if packed:
        batch["doc_ids"] = torch.from_numpy(docs[:, :-1])
    return batch


class SFTStream(StepStream):
    """The SFT stream: each slot's row of whole examples, in a seeded order per epoch."""

    def __init__(
        self,
        split: TokenSplit,
        name: str,
        max_length: int,
        packing: bool,
        seed: int,
        pad_id: int,
        layout: BatchLayout,
        start_step: int,
        max_steps: int,
    ) -> None:
        super().__init__(layout, start_step, max_steps)
        self.split, self.max_tokens, self.packing = split, max_length + 1, packing
        self.seed, self.key, self.pad_id = seed, domain_key(name), pad_id
        self.lengths = np.diff(np.asarray(split.doc_offsets))

    @lru_cache(maxsize=2)  # noqa: B019 - one stream per loader; epochs are reused in order
    def _epoch(self, epoch: int) -> list[np.ndarray]:
        return example_rows(self.lengths, self.max_tokens, self.packing, self.seed, epoch, self.key)

    def _row(self, g: int) -> np.ndarray:
        """Example ids of global row g (counted over epochs from the start of training)."""
        epoch = 0
        while g >= len(self._epoch(epoch)):
            g -= len(self._epoch(epoch))
            epoch += 1
        return self._epoch(epoch)[g]

    def micro_batch(self, index: int) -> dict[str, torch.Tensor]:
        step, slot = self.slots(index)
        lo = step * self.batch_size + slot
        rows = [
            build_row(self.split, self._row(g), self.max_tokens) for g in range(lo, lo + self.micro)
        ]
        return collate_rows(rows, self.pad_id, 0, self.packing)


class ValidationExamples(IterableDataset):
    """The first ``max_examples`` validation examples, one per row, this rank's share: the
    same examples for any world size, and the same number of rows on every rank (a short share
    is padded with rows whose loss mask is zero, as ``ValidationBlocks``)."""

    def __init__(
        self,
        split: TokenSplit,
        max_length: int,
        batch_size: int,
        pad_id: int,
        max_examples: int | None,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        self.split, self.max_tokens, self.batch_size, self.pad_id = (
            split,
            max_length + 1,
            batch_size,
            pad_id,
        )
        n = split.num_docs if max_examples is None else min(split.num_docs, max_examples)
        self.mine, self.real = rank_share(n, rank, world_size)

    def __len__(self) -> int:
        return -(-len(self.mine) // self.batch_size)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        for lo in range(0, len(self.mine), self.batch_size):
            rows = [
                build_row(self.split, np.array([e]), self.max_tokens)
                for e in self.mine[lo : lo + self.batch_size]
            ]
            batch = collate_rows(rows, self.pad_id, 0, packed=False)
            batch["loss_mask"][max(self.real - lo, 0) :] = 0.0  # padding rows count nothing
            yield batch


class SFTDataModule(StepDataModule):
    """Fine-tuning on one prepared domain, with the general corpus' validation sets alongside.

    Args:
        store: the store holding the SFT domain (prepared with the pretraining tokenizer).
        target: the SFT domain; its validation split is logged as ``val/<target>/loss``.
        general_val_sets: domains of ``general_store`` evaluated at every validation
            (forgetting), logged as ``val/<name>/loss``.
        general_store: where the general sets live (default: ``store``); same tokenizer.
        max_length: tokens per row; longer examples are truncated (counted and reported).
        packing: pack several whole examples per row (attention never crosses them) instead
            of one right-padded example per row.
        micro_batch_size, seed, num_workers, prefetch_factor: as in ``MixtureDataModule``.
        val_max_examples: cap on in-domain validation examples (the first ones).
        general_val_max_blocks: cap on sequences per general validation set.
    """

    def __init__(
        self,
        store: str,
        target: str,
        general_val_sets: list[str] | None = None,
        general_store: str | None = None,
        max_length: int = 512,
        packing: bool = False,
        micro_batch_size: int = 8,
        seed: int = 0,
        num_workers: int = 0,
        prefetch_factor: int = 2,
        val_max_examples: int | None = 256,
        general_val_max_blocks: int | None = 64,
    ) -> None:
        super().__init__(micro_batch_size, seed, num_workers, prefetch_factor)
        self.store = Store(store)
        self.general = Store(general_store) if general_store else self.store
        if self.general.tokenizer_hash != self.store.tokenizer_hash:
            raise MidtrainError(
                f"data.general_store: {general_store} was tokenized with another tokenizer "
                f"than {store}; prepare both with the same tokenizer"
            )
        split = self.store.domain(target).train
        if split.num_docs == 0:
            raise MidtrainError(f"data.target: domain {target!r} has no training examples")
        if max_length <= 0:
            raise MidtrainError(f"data.max_length: must be positive, got {max_length}")
        self.target = target
        self.general_val_sets = list(general_val_sets or [])
        for name in self.general_val_sets:
            self.general.domain(name)  # unknown name -> one-line error
            if self.general.domain(name).val.num_blocks(max_length) == 0:
                raise MidtrainError(
                    f"data.general_val_sets: {name!r} has no validation sequence of "
                    f"{max_length} tokens"
                )
            if name == target:
                raise MidtrainError("data.general_val_sets: the target is evaluated already")
        self.max_length = max_length
        self.packing = packing
        self.val_max_examples = val_max_examples
        self.general_val_max_blocks = general_val_max_blocks
        lengths = np.diff(np.asarray(split.doc_offsets))
        self.num_truncated = int((lengths > max_length + 1).sum())
        self.num_examples = len(lengths)

    # -- what other components read (the data contract) ------------------------------------
    @property
    def seq_len(self) -> int:
        """The longest row: ``max_length`` tokens (the model's context must hold it)."""
        return self.max_length

    @property
    def domains(self) -> list[str]:
        return [self.target]

    def weights_at(self, step: int) -> dict[str, float]:
        return {self.target: 1.0}

    def phase_starts(self) -> list[int]:
        return [0]

    @property
    def val_set_names(self) -> list[str]:
        return [self.target, *self.general_val_sets]

    def val_bytes_per_token(self, name: str) -> float:
        store = self.store if name == self.target else self.general
        split = store.domain(name).val
        return split.num_bytes / max(split.num_tokens, 1)

    def fingerprint(self) -> dict[str, Any]:
        return {
            "store": self.store.fingerprint([self.target]),
            "seed": self.seed,
            "max_length": self.max_length,
            "packing": self.packing,
        }

    # -- Lightning hooks ------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        if stage == "fit" and self.num_truncated:
            rank_zero_info(
                f"SFT {self.target}: {self.num_truncated} of {self.num_examples} "
                f"training examples truncated to max_length {self.max_length}"
            )

    def train_stream(self, trainer: L.Trainer) -> IterableDataset:
        return SFTStream(
            self.store.domain(self.target).train,
            self.target,
            self.max_length,
            self.packing,
            self.seed,
            self.store.eos_id,
            BatchLayout.of(trainer, self.micro_batch_size),
            start_step=trainer.global_step,
            max_steps=trainer.max_steps,
        )

    def val_datasets(self, rank: int, world_size: int) -> list[IterableDataset]:
        return [
            ValidationExamples(
                self.store.domain(self.target).val,
                self.max_length,
                self.micro_batch_size,
                self.store.eos_id,
                self.val_max_examples,
                rank,
                world_size,
            ),
            *validation_blocks(
                self.general,
                self.general_val_sets,
                self.max_length,
                self.micro_batch_size,
                self.general_val_max_blocks,
                rank,
                world_size,
            ),  # fmt: skip
        ]

    def state_dict(self) -> dict[str, Any]:
        return {"fingerprint": self.fingerprint()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Nothing to restore: the stream is a pure function of the step (the planner,
        ``midtrain.checkpoint.plan``, compared ``fingerprint`` with the checkpoint's)."""
        return None
