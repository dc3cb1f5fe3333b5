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

# Where midtrain.callbacks.EMA keeps the averaged weights in a checkpoint: ``state_dict`` stays
# the live weights (what a resume, a fork and init_from continue from); the averaged ones sit
# beside them, as {"state_dict": {"model.<name>": tensor}, "n_averaged", "latest_update_step",
# "decay"}.
EMA_KEY = "ema"
WEIGHTS = ("live", "ema")  # --weights: which of a checkpoint's weights a tool reads


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


def load_weights(path: str | Path, weights: str = "live") -> dict[str, torch.Tensor]:
    """Model weights (``GPT`` names) from a Lightning checkpoint file or distributed directory,
    or from a plain state dict file; ``weights="ema"``: the averaged weights of a checkpoint
    written with ``midtrain.callbacks.EMA``."""
    path = Path(path)
    check_weights_choice(weights)
    if is_distributed(path):
        if weights == "ema":
            raise MidtrainError(f"{path}: a distributed checkpoint has no averaged (EMA) weights")
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            state = torch.load(
                consolidate(path, Path(tmp) / "full.ckpt"), map_location="cpu", weights_only=True
            )
    else:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    if weights == "ema":
        state = averaged_state(state, path)
    state = state.get("state_dict", state)
    if any(k.startswith("model.") for k in state):
        state = {k[len("model.") :]: v for k, v in state.items() if k.startswith("model.")}
    return state


def check_weights_choice(weights: str, where: str = "--weights") -> None:
    if weights not in WEIGHTS:
        raise MidtrainError(f"{where}: {weights!r} is not one of {', '.join(WEIGHTS)}")


def averaged_state(checkpoint: dict[str, Any], path: str | Path) -> dict[str, Any]:
    """The averaged (EMA) part of a checkpoint, or a one-line error naming the file."""
    ema = checkpoint.get(EMA_KEY) if isinstance(checkpoint, dict) else None
    if not isinstance(ema, dict) or "state_dict" not in ema:
        raise MidtrainError(
            f"--weights ema: {path} has no averaged weights (it was not trained with "
            "midtrain.callbacks.EMA); use --weights live"
        )
    return ema


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
