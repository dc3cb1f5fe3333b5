"""The contract between data and model: what ``CausalLM``, the CLI and the callbacks read from a
data module, by name.

``DataContract`` is the interface (a ``Protocol``: any ``LightningDataModule`` with these members
works); ``StepDataModule`` is the base class of midtrain's own data modules and holds what they
share (step-indexed training loaders that count what they hand out, validation loaders sharded by
rank, the fingerprint check of ``state_dict``). ``require_contract`` turns a data module that
lacks a member into one line naming what is missing.
"""

from __future__ import annotations

import signal
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, Protocol, cast, runtime_checkable

import lightning as L
from torch.utils.data import DataLoader, IterableDataset

from midtrain.errors import MidtrainError
from midtrain.run_state import Rule, RunPlan, Setting

if TYPE_CHECKING:
    from midtrain.data.store import Store


@runtime_checkable
class DataContract(Protocol):
    """What a data module tells the model and the callbacks.

    vocab_size: tokens of the tokenizer (the model's vocabulary must hold them).
    eos_id: the end-of-document token (document masking splits packed rows at it).
    seq_len: the longest row in tokens the model is fed (checked against its context).
    domains: the training domains, in a fixed order: batch["domain"] indexes this list.
    val_set_names: the validation sets, in the order of ``val_dataloader()``.
    """

    vocab_size: int
    eos_id: int
    seq_len: int
    domains: list[str]
    val_set_names: list[str]

    def val_bytes_per_token(self, name: str) -> float:
        """Average UTF-8 bytes per token of validation set ``name`` (for bits per byte)."""
        ...

    def weights_at(self, step: int) -> dict[str, float]:
        """Normalised mixture weight of every domain at optimizer step ``step``."""
        ...

    def phase_starts(self) -> list[int]:
        """Optimizer steps at which a mixture phase starts (0 first)."""
        ...


@runtime_checkable
class ScheduleSource(Protocol):
    """A callback that adds a phase to a data module's mixture schedule before training
    (``midtrain.callbacks.MixtureSwitch``): registering again replaces its phase."""

    def register(self, datamodule: object, max_steps: int) -> None: ...


CONTRACT_MEMBERS = (
    "vocab_size",
    "eos_id",
    "seq_len",
    "domains",
    "val_set_names",
    "val_bytes_per_token",
    "weights_at",
    "phase_starts",
)


def require_contract(datamodule: object) -> DataContract:
    """``datamodule`` as a ``DataContract``, or one line naming the members it lacks."""
    missing = [m for m in CONTRACT_MEMBERS if not hasattr(datamodule, m)]
    if missing:
        raise MidtrainError(
            f"data: {type(datamodule).__name__} does not implement midtrain's data contract "
            f"(midtrain.data.contract.DataContract); missing: {', '.join(missing)}"
        )
    return cast(DataContract, datamodule)


def require_max_steps(trainer: L.Trainer | None, why: str) -> int:
    """``trainer.max_steps``, which midtrain's schedules are keyed by; a one-line error if unset."""
    if trainer is None or trainer.max_steps is None or trainer.max_steps <= 0:
        raise MidtrainError(f"trainer.max_steps: set it; {why}")
    return trainer.max_steps


def fresh_data_unsupported(datamodule: Any) -> MidtrainError:
    """The one line for ``--fork_data fresh`` with a data module that has no schedule to restart."""
    return MidtrainError(
        f"fork_data: fresh restarts a mixture schedule at the fork step; "
        f"{type(datamodule).__name__} has none (an SFT stream has one phase): fork with "
        "--fork_data keep, or start a new fine-tuning run from the weights with "
        "--model.init_from <checkpoint> (its stream starts at the first example)"
    )


# Signals a cluster sends to stop a job (Slurm's pre-timeout SIGUSR1, SIGTERM; SIGUSR2 for
# other schedulers): the main process saves and exits (midtrain.train.callbacks.preemption.Preemption), so a signal
# sent to the whole process group must not kill the loader's workers mid-batch.
WORKER_IGNORED_SIGNALS = ("SIGTERM", "SIGUSR1", "SIGUSR2")


def ignore_preemption_signals(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: the main process owns preemption signals."""
    for name in WORKER_IGNORED_SIGNALS:
        signal.signal(getattr(signal, name), signal.SIG_IGN)


class StepLoader(DataLoader):
    """A DataLoader over a self-batching, self-sharding dataset (no sampler, no collation) that
    counts the batches it has handed out since its last ``iter()``: the stream's own accounting
    of how far the loader may have run ahead (see ``produced``)."""

    def __init__(
        self, dataset: IterableDataset, num_workers: int = 0, prefetch_factor: int = 2
    ) -> None:
        super().__init__(
            dataset,
            batch_size=None,
            num_workers=num_workers,
            prefetch_factor=prefetch_factor if num_workers > 0 else None,
            worker_init_fn=ignore_preemption_signals if num_workers > 0 else None,
        )
        self.handed_out = 0

    # torch annotates its private iterator class; a generator serves every caller (a for loop)
    def __iter__(self) -> Iterator[Any]:  # type: ignore[override]
        self.handed_out = 0
        for batch in super().__iter__():
            self.handed_out += 1
            yield batch

    def produced(self) -> int:
        """Batches of this iteration that may exist already: handed out, plus what the workers
        have been asked for in advance (num_workers x prefetch_factor)."""
        ahead = self.num_workers * (self.prefetch_factor or 0)  # None without workers
        return self.handed_out + ahead


class StepDataModule(L.LightningDataModule):
    """Shared machinery of midtrain's data modules (both implement ``DataContract``).

    Subclasses set ``store`` (its ``vocab_size`` and ``eos_id`` are the contract's), pass the
    loader settings to ``__init__``, and implement ``train_stream()``,
    ``val_datasets()`` and ``fingerprint()``.
    """

    store: Store

    def __init__(
        self, micro_batch_size: int, seed: int, num_workers: int, prefetch_factor: int
    ) -> None:
        """The loader settings both data modules share (checked here, once)."""
        super().__init__()
        if micro_batch_size <= 0:
            raise MidtrainError(f"data.micro_batch_size: must be positive, got {micro_batch_size}")
        if num_workers < 0:
            raise MidtrainError(f"data.num_workers: must be >= 0, got {num_workers}")
        self.micro_batch_size = micro_batch_size
        self.seed = seed
        self.num_workers = num_workers
        self.prefetch_factor = prefetch_factor
        self.train_loader: StepLoader | None = None  # the loader of the running fit

    fresh_data = False  # whether this data module can start a fresh stream at a fork

    @property
    def vocab_size(self) -> int:
        return self.store.vocab_size

    @property
    def eos_id(self) -> int:
        return self.store.eos_id

    # -- what subclasses define -------------------------------------------------------------
    def train_stream(self, trainer: L.Trainer) -> IterableDataset:
        raise NotImplementedError

    def val_datasets(self, rank: int, world_size: int) -> list[IterableDataset]:
        raise NotImplementedError

    def fingerprint(self) -> dict[str, Any]:
        """What the stream depends on, by ``data.<key>``: the past of a run (a resume and a
        fork keep it)."""
        raise NotImplementedError

    # -- run state (midtrain.checkpoint.plan) -----------------------------------------------
    def run_settings(self, trainer: L.Trainer) -> dict[str, Setting]:
        """``fingerprint`` (the stream's past) and how the global batch is split: its size is
        the past, the micro-batch may change on a resume (with accumulation or world size)."""
        settings = {f"data.{k}": Setting(v, Rule.PAST) for k, v in self.fingerprint().items()}
        micro = self.micro_batch_size
        settings["data.global_batch_size"] = Setting(
            micro * trainer.accumulate_grad_batches * trainer.world_size, Rule.PAST
        )
        settings["data.micro_batch_size"] = Setting(micro, Rule.ELASTIC)
        return settings

    def check_plan(self, plan: RunPlan, trainer: L.Trainer) -> None:
        """A fork with ``--fork_data fresh`` needs a schedule to restart."""
        if plan.fork is not None and plan.fork.data != "keep" and not self.fresh_data:
            raise fresh_data_unsupported(self)

    # -- Lightning hooks ------------------------------------------------------------------
    def train_dataloader(self) -> DataLoader:
        trainer = self.trainer
        require_max_steps(trainer, "midtrain schedules data by steps")
        assert trainer is not None  # refused above
        self.train_loader = StepLoader(
            self.train_stream(trainer), self.num_workers, self.prefetch_factor
        )
        return self.train_loader

    def val_dataloader(self) -> list[DataLoader]:
        rank, world = (
            (self.trainer.global_rank, self.trainer.world_size) if self.trainer else (0, 1)
        )
        return [DataLoader(d, batch_size=None) for d in self.val_datasets(rank, world)]

    # `midtrain test` evaluates the validation sets too (logged as test/<set>/...);
    # `midtrain predict` returns per-sequence losses on them.
    def test_dataloader(self) -> list[DataLoader]:
        return self.val_dataloader()

    def predict_dataloader(self) -> list[DataLoader]:
        return self.val_dataloader()
