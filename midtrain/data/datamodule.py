"""``MixtureDataModule``: prepared domains mixed by weight into a deterministic stream."""

from __future__ import annotations

from typing import Any

import lightning as L
from torch.utils.data import DataLoader

from midtrain.data.loader import MixtureStream, ValidationBlocks
from midtrain.data.mixture import MixtureSchedule, Phase, check_weights
from midtrain.data.store import Store
from midtrain.errors import MidtrainError


class MixtureDataModule(L.LightningDataModule):
    """Mixes the domains of a token store (built by ``midtrain prepare``).

    Args:
        store: the store root directory.
        weights: domain -> weight (token-weighted: every sequence has seq_len tokens). Default:
            every domain with training data, in proportion to its training tokens.
        seq_len: tokens per training sequence (blocks of seq_len + 1, never mixing domains).
        micro_batch_size: sequences per device per forward pass; the global batch is
            micro_batch_size x accumulate_grad_batches x world size.
        seed: the mixture seed: sample order is a pure function of (seed, schedule, index).
        num_workers, prefetch_factor: DataLoader workers; the stream is identical for any value.
        val_sets: domains whose validation split is evaluated, logged as ``val/<name>/loss``.
            Default: every domain that has validation data.
        val_max_blocks: cap on validation sequences per set (the first ones, always the same).
        val_batch_size: default micro_batch_size.
    """

    def __init__(self, store: str, weights: dict[str, float] | None = None, seq_len: int = 512,
                 micro_batch_size: int = 8, seed: int = 0, num_workers: int = 0,
                 prefetch_factor: int = 2, val_sets: list[str] | None = None,
                 val_max_blocks: int | None = 64, val_batch_size: int | None = None) -> None:
        super().__init__()
        self.store = Store(store)
        if seq_len <= 0:
            raise MidtrainError(f"data.seq_len: must be positive, got {seq_len}")
        if micro_batch_size <= 0:
            raise MidtrainError(f"data.micro_batch_size: must be positive, got {micro_batch_size}")
        if num_workers < 0:
            raise MidtrainError(f"data.num_workers: must be >= 0, got {num_workers}")
        self.seq_len = seq_len
        self.micro_batch_size = micro_batch_size
        self.seed = seed
        self.num_workers = num_workers
        self.prefetch_factor = prefetch_factor
        self.val_max_blocks = val_max_blocks
        self.val_batch_size = val_batch_size or micro_batch_size
        names = self.store.domain_names
        if weights is None:
            weights = {n: float(self.store.domain(n).train.num_tokens) for n in names}
            weights = {n: w for n, w in weights.items() if w > 0}
        check_weights(weights, names, "data.weights")
        self.weights = dict(weights)
        self.extra_phases: list[Phase] = []
        if val_sets is None:
            val_sets = [n for n in names if self.store.domain(n).val.num_blocks(seq_len) > 0]
        for v in val_sets:
            if v not in names:
                raise MidtrainError(
                    f"data.val_sets: unknown domain {v!r}; known: {', '.join(names)}"
                )
            if self.store.domain(v).val.num_blocks(seq_len) == 0:
                raise MidtrainError(
                    f"data.val_sets: domain {v!r} has no validation sequence of seq_len "
                    f"{seq_len} ({self.store.domain(v).val.num_tokens} val tokens); "
                    "lower seq_len or raise its val_fraction in the prepare config"
                )
        self.val_set_names = list(val_sets)
        self._check_domains(self.weights, "data.weights")

    def _check_domains(self, weights: dict[str, float], where: str) -> None:
        for name, w in weights.items():
            split = self.store.domain(name).train
            if w > 0 and split.num_blocks(self.seq_len) == 0:
                raise MidtrainError(
                    f"{where}.{name}: empty domain: {split.num_tokens} training tokens, fewer "
                    f"than one sequence of seq_len {self.seq_len} + 1"
                )

    # -- what other components read -------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self.store.vocab_size

    @property
    def phases(self) -> list[Phase]:
        return [Phase(0, self.weights), *self.extra_phases]

    @property
    def domains(self) -> list[str]:
        """Training domains, in store order: every domain with weight in some phase."""
        used = {n for p in self.phases for n, w in p.weights.items() if w > 0}
        return [n for n in self.store.domain_names if n in used]

    def schedule(self, global_batch_size: int) -> MixtureSchedule:
        return MixtureSchedule(self.domains, self.phases, global_batch_size, self.seed)

    def fingerprint(self) -> dict[str, Any]:
        """What a checkpoint must agree with to resume this data stream exactly."""
        return {
            "store": self.store.fingerprint(self.domains),
            "seq_len": self.seq_len,
            "seed": self.seed,
            "phases": [(p.start_step, dict(sorted(p.weights.items()))) for p in self.phases],
        }

    # -- Lightning hooks ------------------------------------------------------------------
    def train_dataloader(self) -> DataLoader:
        trainer = self.trainer
        if trainer is None or trainer.max_steps is None or trainer.max_steps <= 0:
            raise MidtrainError("trainer.max_steps: set it; midtrain schedules data by steps")
        accumulation = trainer.accumulate_grad_batches
        world = trainer.world_size
        schedule = self.schedule(self.micro_batch_size * accumulation * world)
        stream = MixtureStream(
            [self.store.domain(n).train for n in schedule.domains], schedule, self.seq_len,
            self.micro_batch_size, accumulation, trainer.global_rank, world,
            start_step=trainer.global_step, max_steps=trainer.max_steps,
        )
        return self._loader(stream, self.num_workers)

    def val_dataloader(self) -> list[DataLoader]:
        rank, world = (self.trainer.global_rank, self.trainer.world_size) if self.trainer else (0, 1)
        return [
            self._loader(ValidationBlocks(self.store.domain(n).val, self.seq_len,
                                          self.val_batch_size, self.val_max_blocks, rank, world), 0)
            for n in self.val_set_names
        ]

    def _loader(self, dataset: Any, num_workers: int) -> DataLoader:
        return DataLoader(
            dataset, batch_size=None, num_workers=num_workers,
            prefetch_factor=self.prefetch_factor if num_workers > 0 else None,
            persistent_workers=False,
        )

    def state_dict(self) -> dict[str, Any]:
        return {"fingerprint": self.fingerprint()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        saved, now = state_dict.get("fingerprint"), self.fingerprint()
        if saved is None:
            return
        for key in ("store", "seq_len", "seed"):
            if saved[key] != now[key]:
                raise MidtrainError(
                    f"data.{key}: the checkpoint was trained with {key} {saved[key]!r}, this run "
                    f"has {now[key]!r}; resuming would not continue the same data stream"
                )
