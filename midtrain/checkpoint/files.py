"""Checkpoint files in both forms Lightning writes: one file, or a distributed (sharded)
directory from ``ModelParallelStrategy`` (``*.distcp`` shards plus ``meta.pt`` with everything
else): reading their metadata and weights, checking that one is complete, consolidating."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from midtrain.checkpoint.atomic import TEMP_MARK, atomic_save
from midtrain.errors import MidtrainError


def is_distributed(path: str | Path) -> bool:
    return Path(path).is_dir() and (Path(path) / "meta.pt").is_file()


def read_metadata(path: str | Path) -> dict[str, Any]:
    """Everything but the tensors: global_step, loops, datamodule and callback state, hparams."""
    path = Path(path)
    if is_distributed(path):
        return torch.load(path / "meta.pt", map_location="cpu", weights_only=True)
    if path.is_file():
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    raise MidtrainError(f"{path}: not a checkpoint (neither a file nor a distributed checkpoint)")


def consolidate(path: str | Path, out: str | Path) -> Path:
    """A distributed checkpoint as one file: full (unsharded) tensors plus its metadata."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    path, out = Path(path), Path(out)
    if not is_distributed(path):
        raise MidtrainError(f"consolidate: {path} is not a distributed checkpoint directory")
    if out.exists():
        raise MidtrainError(f"consolidate: {out} exists; choose a new file")
    tmp = out.with_name(f".{out.name}{TEMP_MARK}{os.getpid()}-full")  # next to out, not TMPDIR
    try:
        dcp_to_torch_save(path, tmp)
        state = torch.load(tmp, map_location="cpu", weights_only=True)
    finally:
        tmp.unlink(missing_ok=True)
    state.update(read_metadata(path))
    return atomic_save(state, out)


def load_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """Model weights (``GPT`` names) from a Lightning checkpoint file or distributed directory,
    or from a plain state dict file."""
    path = Path(path)
    if is_distributed(path):
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            state = torch.load(
                consolidate(path, Path(tmp) / "full.ckpt"), map_location="cpu", weights_only=True
            )
    else:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    state = state.get("state_dict", state)
    if any(k.startswith("model.") for k in state):
        state = {k[len("model.") :]: v for k, v in state.items() if k.startswith("model.")}
    return state


def loadable(path: Path) -> tuple[dict[str, Any] | None, str]:
    """(metadata, "") of a complete checkpoint, or (None, why not)."""
    try:
        meta = read_metadata(path)
    except MidtrainError as e:
        return None, str(e)
    except Exception as e:  # truncated zip, text file, pickle error: all "not a checkpoint"
        return None, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}".strip()
    if not isinstance(meta, dict) or "global_step" not in meta:
        return None, "not a Lightning checkpoint (no global_step)"
    return meta, ""


def check_checkpoint(path: str | Path, what: str) -> dict[str, Any]:
    """The metadata of a checkpoint given on the command line, or a one-line error."""
    path = Path(path)
    if not path.exists():
        raise MidtrainError(f"{what}: checkpoint not found: {path}")
    meta, why = loadable(path)
    if meta is None:
        raise MidtrainError(f"{what}: {path} is not a readable checkpoint ({why})")
    return meta


def run_checkpoints_in(directory: Path) -> list[Path]:
    """Checkpoint files and distributed checkpoint directories in a checkpoint directory."""
    if not directory.is_dir():
        return []
    return sorted(
        p
        for p in directory.iterdir()
        if not p.name.startswith(".")
        and ((p.is_file() and p.suffix == ".ckpt") or is_distributed(p))
    )
