"""Scoring primitives shared by the lm-eval adapter and the local runner: summed continuation
log-probabilities in batches, exactly as the model assigns them (float32 log-softmax)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import cast

import torch
import torch.nn.functional as F

from midtrain.model.gpt import GPT


@torch.no_grad()
def continuation_logprobs(
    model: GPT, pairs: Sequence[tuple[Sequence[int], Sequence[int]]], batch_size: int = 8
) -> list[tuple[float, bool]]:
    """For each (context ids, continuation ids): log P(continuation | context) summed over its
    tokens, and whether every continuation token is the argmax (greedy). Inputs longer than the
    model context keep their last block_size + 1 tokens (the continuation always kept whole)."""
    limit = model.config.block_size
    out: list[tuple[float, bool] | None] = [None] * len(pairs)
    rows = []
    for i, (ctx, cont) in enumerate(pairs):
        if not cont:
            out[i] = (0.0, True)
            continue
        whole = (list(ctx) + list(cont))[-(limit + 1) :]
        rows.append((i, whole[:-1], list(cont)))
    # longest first: similar lengths share a batch, little padding
    rows.sort(key=lambda r: -len(r[1]))
    device = model.embed.weight.device
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(rows), batch_size):
            batch = rows[start : start + batch_size]
            width = max(len(inp) for _, inp, _ in batch)
            idx = torch.zeros(len(batch), width, dtype=torch.long, device=device)
            for j, (_, inp, _) in enumerate(batch):  # right padding: earlier positions unaffected
                idx[j, : len(inp)] = torch.tensor(inp, dtype=torch.long)
            logprobs = F.log_softmax(model(idx).float(), dim=-1)
            for j, (i, inp, cont) in enumerate(batch):
                n = len(cont)
                lp = logprobs[j, len(inp) - n : len(inp)]
                target = torch.tensor(cont, device=device)
                total = float(lp.gather(-1, target[:, None]).sum())
                greedy = bool((lp.argmax(-1) == target).all())
                out[i] = (total, greedy)
    finally:
        model.train(was_training)
    return cast("list[tuple[float, bool]]", out)  # every slot is filled above
