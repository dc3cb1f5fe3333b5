"""Parallelism and speed options, applied to a built ``GPT`` from the outside (the model file
knows nothing of them), torchtitan-style: activation checkpointing, ``torch.compile``, FSDP2.

Order matters: checkpointing and compile wrap each block first, then ``fully_shard`` shards each
block and the root, then a meta-device model is materialised shard by shard.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.utils.checkpoint import checkpoint

from midtrain.model.gpt import GPT


def apply_activation_checkpointing(model: GPT) -> None:
    """Recompute each block's activations in the backward pass (memory for compute). The
    block's forward is wrapped in place, so parameter names (and checkpoints) are unchanged."""
    for block in model.blocks:
        forward = block.forward

        def checkpointed(
            *args: Any, _forward: Callable[..., torch.Tensor] = forward, **kwargs: Any
        ) -> torch.Tensor:
            return checkpoint(_forward, *args, use_reentrant=False, **kwargs)

        block.forward = checkpointed


def apply_compile(model: GPT, per_block: bool = False) -> None:
    """``torch.compile`` in place, keeping parameter names (and so checkpoints) unchanged.

    Whole trunk (``GPT.features``: embedding, blocks, final norm, one graph) by default; each
    block on its own with ``per_block`` (FSDP2, whose per-block hooks split the graph anyway).
    The loss stays outside the graph: ``midtrain.model.loss`` never builds the full logits."""
    if per_block:
        for block in model.blocks:
            block.compile()
        return
    model.features = torch.compile(model.features)  # type: ignore[method-assign]  # in place


def apply_fsdp(
    model: GPT,
    mesh: torch.distributed.device_mesh.DeviceMesh,
    param_dtype: torch.dtype | None = None,
    reduce_dtype: torch.dtype | None = torch.float32,
) -> None:
    """FSDP2: shard every transformer block, then the root (embeddings, final norm, head)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)
    for block in model.blocks:
        fully_shard(block, mesh=mesh, mp_policy=mp)
    fully_shard(model, mesh=mesh, mp_policy=mp)


@torch.no_grad()
def materialize(model: GPT, device: torch.device) -> None:
    """Allocate a (sharded) meta-device model on ``device`` and give every parameter its
    initial value: each rank writes its shard of the same full value, so the sharded model
    starts exactly where an unsharded one would."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    model.to_empty(device=device)
    model.reset_buffers()
    for name, p in model.named_parameters():
        full = model.initial_value(name, p.shape).to(device=device, dtype=p.dtype)
        if isinstance(p, DTensor):
            shard = distribute_tensor(full, p.device_mesh, p.placements, src_data_rank=None)
            p.to_local().copy_(shard.to_local())
        else:
            p.copy_(full)
