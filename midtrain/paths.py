"""Names on disk, in one place: a run directory's layout, checkpoint file names, and the
ready-made configs shipped inside the package.

A run directory (``trainer.default_root_dir``) holds::

    config.yaml  hparams.yaml  events.out.tfevents.*     written by LightningCLI / TensorBoard
    checkpoints/last.ckpt                                 the newest state (``--ckpt_path last``)
    checkpoints/epoch=0-step=<N>.ckpt                     periodic (ModelCheckpoint)
    checkpoints/switch-step=<N>.ckpt                      before a MixtureSwitch at step N
    checkpoints/step=<N>.ckpt                             fork points (CheckpointAtSteps)
    validate/ test/ predict/                              evaluation logs, one per command
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import lightning.pytorch as pl

CHECKPOINTS = "checkpoints"
LAST = "last.ckpt"
CONFIG = "config.yaml"


def switch_checkpoint(step: int) -> str:
    """The state right before the mixture switch at optimizer step ``step``."""
    return f"switch-step={step}.ckpt"


def step_checkpoint(step: int) -> str:
    """A fork point: the state right before optimizer step ``step``."""
    return f"step={step}.ckpt"


def run_checkpoints(run_dir: str | Path) -> Path:
    return Path(run_dir) / CHECKPOINTS


def checkpoint_dir(trainer: pl.Trainer) -> Path:
    """Where a trainer's checkpoints go: its checkpoint callback's directory, or the default."""
    ckpt = trainer.checkpoint_callback
    if ckpt is not None and getattr(ckpt, "dirpath", None):
        return Path(ckpt.dirpath)
    return run_checkpoints(trainer.default_root_dir)


# -- ready-made configs -------------------------------------------------------------------------

def packaged_configs() -> Path:
    """The configs shipped with the package (``configs/`` in a checkout links here)."""
    return Path(str(resources.files("midtrain") / "configs"))


def resolve_config(path: str | Path) -> Path:
    """A config path as given, or, when no such file exists, the shipped config of that name:
    ``configs/pretrain/demo.yaml`` and ``pretrain/demo.yaml`` both work from any directory."""
    given = Path(path)
    if given.exists():
        return given
    parts = given.parts
    relative = Path(*parts[1:]) if parts and parts[0] == "configs" else given
    shipped = packaged_configs() / relative
    return shipped if not given.is_absolute() and shipped.is_file() else given
