"""Atomic checkpoint writes: every checkpoint file (or distributed directory) is written to a
temp name in its own directory, fsynced and renamed, so a reader or a crash sees the old
checkpoint or the complete new one, never a partial file, whatever ``TMPDIR`` is."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.fabric.plugins import TorchCheckpointIO
from lightning.pytorch.strategies import ModelParallelStrategy

TEMP_MARK = ".tmp-"  # temp files are ".<name>.tmp-<pid>" next to their destination


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_save(obj: object, path: str | Path) -> Path:
    """``torch.save`` to a temp file in ``path``'s directory, fsync, then ``os.replace``: a
    reader (or a crash) sees the old file or the complete new one, never a partial file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}{TEMP_MARK}{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    return path


def remove_stale_temps(directory: str | Path) -> list[Path]:
    """Temp files a killed save left in a checkpoint directory (call before training starts)."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    stale = list(directory.glob(f".*{TEMP_MARK}*"))
    for p in stale:
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)  # a distributed checkpoint's temp directory
        else:
            p.unlink(missing_ok=True)
    return stale


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's TorchCheckpointIO, writing atomically in the destination directory.

    Lightning's own save goes through an fsspec transaction that stages the file in ``TMPDIR``
    and then moves it: across filesystems (node-local /tmp, run dir on NFS) that move is a copy,
    and a kill during it leaves a truncated checkpoint in place of the good one."""

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any | None = None
    ) -> None:
        if "://" in str(path):  # remote storage: fsspec's transaction is the right tool there
            return super().save_checkpoint(checkpoint, path, storage_options)
        if storage_options is not None:
            raise TypeError("AtomicCheckpointIO.save_checkpoint: storage_options are not used")
        atomic_save(checkpoint, path)
        return None


def use_atomic_checkpoints(trainer: pl.Trainer) -> None:
    """Swap the strategy's default CheckpointIO for ``AtomicCheckpointIO`` (a user's own
    CheckpointIO plugin is kept); distributed checkpoint directories are written to a temp
    directory and renamed."""
    strategy = trainer.strategy
    if type(strategy.checkpoint_io) is TorchCheckpointIO:
        strategy.checkpoint_io = AtomicCheckpointIO()
    if isinstance(strategy, ModelParallelStrategy):  # writes sharded directories in place
        strategy.save_checkpoint = _atomic_directory_save(strategy)  # type: ignore[method-assign]  # this instance's


def _atomic_directory_save(strategy: ModelParallelStrategy) -> Callable[..., None]:
    """Wrap ``ModelParallelStrategy.save_checkpoint`` (which writes shards in place): every rank
    writes into ``.<name>.tmp-<pid>`` next to the destination; rank 0 then swaps it in. A crash
    leaves the old checkpoint (or, between the two renames, ``.<name>.tmp-old``: resume falls
    back to the newest other checkpoint)."""
    save = strategy.save_checkpoint

    def atomic(
        checkpoint: dict[str, Any], filepath: str | Path, storage_options: Any = None
    ) -> None:
        path = Path(strategy.broadcast(str(filepath)))
        tmp = path.parent / f".{path.name}{TEMP_MARK}{strategy.broadcast(os.getpid())}"
        save(checkpoint, tmp, storage_options)
        strategy.barrier()
        if strategy.global_rank == 0:
            for f in tmp.rglob("*"):
                if f.is_file():
                    with open(f, "rb") as handle:
                        os.fsync(handle.fileno())
            old = path.parent / f".{path.name}{TEMP_MARK}old"
            if path.exists():
                os.replace(path, old)
            os.replace(tmp, path)
            _fsync_dir(path.parent)
            if old.is_dir():
                shutil.rmtree(old)
            elif old.exists():
                old.unlink()
        strategy.barrier()

    return atomic
