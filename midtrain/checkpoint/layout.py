"""A run directory's layout and checkpoint names, in one place.

A run directory (``trainer.default_root_dir``) holds::

    config.yaml  hparams.yaml  events.out.tfevents.*     written by LightningCLI / TensorBoard
    checkpoints/last.ckpt                                 the newest state (``--ckpt_path last``)
    checkpoints/epoch=0-step=<N>.ckpt                     periodic (ModelCheckpoint)
    checkpoints/switch-step=<N>.ckpt                      before a MixtureSwitch at step N
    checkpoints/step=<N>.ckpt                             fork points (CheckpointAtSteps)
    validate/ test/ predict/                              evaluation logs, one per command;
    validate-2/ validate-3/ ...                           later evaluations (``unused_dir``)
    summary.json                                          the end-of-run summary
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import lightning.pytorch as pl


CHECKPOINTS = "checkpoints"
LAST = "last.ckpt"
CONFIG = "config.yaml"
EVENTS = "events.out.tfevents."  # TensorBoard's event files


def switch_checkpoint(step: int) -> str:
    """The state right before the mixture switch at optimizer step ``step``."""
    return f"switch-step={step}.ckpt"


def step_checkpoint(step: int) -> str:
    """A fork point: the state right before optimizer step ``step``."""
    return f"step={step}.ckpt"


def holds_a_record(directory: Path) -> bool:
    """Whether a command already wrote its record here: a config.yaml, a summary or events."""
    return directory.is_dir() and any(
        p.name == CONFIG or p.name.endswith("summary.json") or p.name.startswith(EVENTS)
        for p in directory.iterdir()
    )


def unused_dir(path: Path) -> Path:
    """``path``, or when a command already wrote its record there, the first of
    ``<path>-2``, ``<path>-3``, ... where none did: an evaluation never writes over an earlier
    one's config.yaml, summary and events (other files, e.g. a study's stage markers, do not
    count)."""
    candidate, n = path, 1
    while holds_a_record(candidate):
        n += 1
        candidate = path.with_name(f"{path.name}-{n}")
    return candidate


def run_checkpoints(run_dir: str | Path) -> Path:
    return Path(run_dir) / CHECKPOINTS


def checkpoint_dir(trainer: pl.Trainer) -> Path:
    """Where a trainer's checkpoints go: its checkpoint callback's directory, or the default."""
    ckpt = trainer.checkpoint_callback
    dirpath = getattr(ckpt, "dirpath", None)
    if dirpath:
        return Path(dirpath)
    return run_checkpoints(trainer.default_root_dir)


def check_run_dir(root: Path, checkpoints: Path, fresh: bool) -> None:
    """The run directory can be written, and a new run (``fresh``) does not mix with another
    run's checkpoints (a later ``--ckpt_path last`` would pick from both)."""
    from midtrain.checkpoint.files import run_checkpoints_in
    from midtrain.errors import MidtrainError

    for path in (root, checkpoints):
        if path.exists() and not path.is_dir():
            raise MidtrainError(
                f"trainer.default_root_dir: {path} is a file, not a run "
                "directory; choose another path"
            )
    existing = next((p for p in (checkpoints, root, *root.parents) if p.exists()), None)
    if existing is not None and not os.access(existing, os.W_OK | os.X_OK):
        raise MidtrainError(
            f"trainer.default_root_dir: {existing} is not writable; "
            "fix its permissions or choose another run directory"
        )
    if fresh and (found := run_checkpoints_in(checkpoints)):
        raise MidtrainError(
            f"trainer.default_root_dir: {checkpoints} already holds another "
            f"run's checkpoints ({found[0].name}, ...); continue it with --ckpt_path "
            "last, or choose a new trainer.default_root_dir"
        )
