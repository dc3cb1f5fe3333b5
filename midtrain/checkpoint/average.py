"""``midtrain average``: a uniform soup of checkpoints of one model (OLMo 2's stage-2 soup),
the elementwise mean of their weights, written whole or not at all as a weights-only
checkpoint that ``midtrain validate --ckpt_path``, ``midtrain export`` and ``init_from`` read."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from midtrain.checkpoint.atomic import atomic_save
from midtrain.checkpoint.files import check_weights_choice
from midtrain.checkpoint.load import AVERAGED_FROM, load_checkpoint
from midtrain.errors import MidtrainError
from midtrain.model.config import ModelConfig

# What a soup keeps of its first input's metadata: enough for Lightning's validate and for
# load_checkpoint (hyperparameters); not the optimizer, loops, callbacks or data position, which
# belong to one run's state and would make the soup look resumable.
KEPT_KEYS = ("epoch", "pytorch-lightning_version", "hyper_parameters", "hparams_name")


def _config_difference(a: ModelConfig, b: ModelConfig) -> str:
    da, db = asdict(a), asdict(b)
    return ", ".join(f"{k} {da[k]!r} vs {db.get(k)!r}" for k in da if da[k] != db.get(k))


def _check_same_shape(
    path: Path, first: Path, state: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]
) -> None:
    missing, extra = sorted(set(ref) - set(state)), sorted(set(state) - set(ref))
    if missing or extra:
        raise MidtrainError(
            f"average: {path} has other parameters than {first} (missing {missing[:3]}, extra "
            f"{extra[:3]}); average checkpoints of one model"
        )
    for name, tensor in state.items():
        if tensor.shape != ref[name].shape:
            raise MidtrainError(
                f"average: {path}: {name} has shape {tuple(tensor.shape)} but "
                f"{tuple(ref[name].shape)} in {first}; average checkpoints of one model"
            )


def average_states(
    paths: Sequence[Path], weights: str = "live"
) -> tuple[dict[str, torch.Tensor], dict[str, Any], list[int]]:
    """The elementwise mean of the checkpoints' weights (summed in float64, returned in each
    tensor's own dtype), the first checkpoint's metadata and every input's global step; one
    line naming the first file of another model config, other parameter names or shapes."""
    sums: dict[str, torch.Tensor] = {}
    dtypes: dict[str, torch.dtype] = {}
    first_config, first_meta, steps = None, {}, []
    for path in paths:
        config, state, meta = load_checkpoint(path, f"average: {path}", weights)
        if first_config is None:
            first_config, first_meta, dtypes = config, meta, {k: v.dtype for k, v in state.items()}
            sums = {k: torch.zeros(v.shape, dtype=torch.float64) for k, v in state.items()}
        elif config != first_config:
            raise MidtrainError(
                f"average: {path} is another model than {paths[0]} "
                f"({_config_difference(config, first_config)})"
            )
        _check_same_shape(path, paths[0], state, sums)
        steps.append(int(meta.get("global_step", 0)))
        for name, tensor in state.items():
            sums[name] += tensor.double()
        del state  # one input in memory at a time (the files are memory-mapped)
    mean = {k: (v / len(paths)).to(dtypes[k]) for k, v in sums.items()}
    return mean, first_meta, steps


def average_checkpoints(
    paths: Sequence[str | Path], out: str | Path, weights: str = "live"
) -> Path:
    """Write the uniform average of ``paths`` (at least two checkpoints of one model) to the new
    file ``out``; ``weights="ema"`` averages their EMA weights. Nothing is written on error."""
    check_weights_choice(weights)
    files, target = [Path(p) for p in paths], Path(out)
    if len(files) < 2:
        raise MidtrainError(f"average: give at least 2 checkpoints to average, got {len(files)}")
    if target.exists():
        raise MidtrainError(f"--out: {target} exists; choose a new file")
    for path in files:
        if not path.exists():
            raise MidtrainError(f"average: checkpoint not found: {path}")
    mean, meta, steps = average_states(files, weights)
    soup: dict[str, Any] = {k: meta[k] for k in KEPT_KEYS if k in meta}
    soup["global_step"] = max(steps)
    soup["state_dict"] = {f"model.{k}": v for k, v in mean.items()}
    soup[AVERAGED_FROM] = {
        "sources": [str(p.resolve()) for p in files],
        "global_steps": steps,
        "weights": weights,
    }
    return atomic_save(soup, target)
