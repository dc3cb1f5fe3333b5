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


def _shipped(name: str | Path) -> Path:
    """A shipped config file or folder by name (``pretrain/demo.yaml``, ``configs/pretrain``,
    ``all``); a one-line error naming what exists otherwise."""
    from midtrain.errors import MidtrainError

    root = packaged_configs()
    parts = Path(name).parts
    relative = Path(*parts[1:]) if parts and parts[0] == "configs" else Path(name)
    target = root if str(name) in ("all", "configs", "configs/") else root / relative
    if Path(name).is_absolute() or ".." in parts or not target.exists():
        kinds = ", ".join(sorted(p.name for p in root.iterdir() if p.is_dir()))
        raise MidtrainError(f"configs: no shipped config {str(name)!r}; see `midtrain configs "
                            f"list` (kinds: {kinds}, or all)")
    return target


def _summary(path: Path) -> str:
    """The first comment line of a config: what it is."""
    for line in path.read_text().splitlines():
        if line.startswith("#"):
            return line.lstrip("# ").strip()
        if line.strip():
            break
    return ""


def list_configs() -> str:
    """Every shipped config by name, with the first line of its header comment."""
    root = packaged_configs()
    names = sorted(p.relative_to(root).as_posix() for p in root.rglob("*.yaml"))
    width = max(len(n) for n in names)
    lines = [f"ready-made configs in {root} (use as --config configs/<name> from any directory):"]
    lines += [f"  {n:<{width}}  {_summary(root / n)}".rstrip() for n in names]
    return "\n".join(lines)


def show_config(name: str) -> str:
    from midtrain.errors import MidtrainError

    path = _shipped(name)
    if not path.is_file():
        raise MidtrainError(f"configs: {name!r} is a folder; show takes one config file")
    return path.read_text()


def copy_configs(name: str, dest: str) -> list[Path]:
    """Copy a shipped config (or a folder of them, or ``all``) out of the package. A file goes
    to ``dest`` (or into it, when it is a folder); a folder's files keep their names under
    ``dest``. Refuses to overwrite anything, before writing anything."""
    import shutil

    from midtrain.errors import MidtrainError

    source, into_dir = _shipped(name), str(dest).endswith(("/", "\\"))
    dest = Path(dest)
    if source.is_file():
        into_dir = into_dir or dest.is_dir()
        pairs = [(source, dest / source.name if into_dir else dest)]
    else:
        pairs = [(f, dest / f.relative_to(source)) for f in sorted(source.rglob("*.yaml"))]
    existing = [str(to) for _, to in pairs if to.exists()]
    if existing:
        more = f" (and {len(existing) - 1} more)" if len(existing) > 1 else ""
        raise MidtrainError(f"configs: {existing[0]} exists{more}; copy to a new place or "
                            f"remove it first")
    for src, to in pairs:
        to.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, to)
    return [to for _, to in pairs]
