"""Cross-entropy over the vocabulary without materialising the full logits.

The plain loss computes ``features @ lm_head.T`` for every token at once: at vocab 50,304 and
seq 2048 that is 412 MB of fp32 logits per sequence, plus as much again for their gradient.
``chunked_cross_entropy`` walks the tokens in chunks: each chunk's logits are built, turned
into its losses, and (when a gradient is wanted) straight into the chunk's gradients with
respect to the features and the head weight, then dropped. Peak memory for the head is one
chunk's logits, and the backward pass is a scaling of what the forward already computed
(Liger-kernel style: no second pass over the vocabulary).

The gradients are computed in the forward pass for a loss that sums the returned per-token
losses with one common weight (a sum or a mean over loss tokens, as ``CausalLM`` does): the
backward pass reads that weight from its incoming gradient. Per-token weights other than the
mask are not supported by this path (use the plain cross-entropy for those).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F


class _ChunkedCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any,
        features: torch.Tensor,
        weight: torch.Tensor,
        targets: torch.Tensor,
        mask: torch.Tensor,
        chunk_size: int,
        compute_dtype: torch.dtype,
    ) -> torch.Tensor:
        # features (N, C), weight (V, C), targets (N,) int, mask (N,) float
        x = features.to(compute_dtype)
        w = weight.to(compute_dtype)
        want_x, want_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        losses = torch.empty(x.shape[0], dtype=torch.float32, device=x.device)
        grad_x = torch.empty_like(x) if want_x else None
        grad_w = torch.zeros(w.shape, dtype=torch.float32, device=w.device) if want_w else None
        # One chunk-sized buffer for the whole call, reused in place by every chunk: logits ->
        # exp -> softmax -> gradient. A fresh one per chunk would be a new large allocation
        # each time (on CPU, glibc maps and zero-fills every block over 32 MB anew).
        rows = min(chunk_size, x.shape[0])
        buf = torch.empty(rows, w.shape[0], dtype=compute_dtype, device=x.device)
        buf32 = (
            buf
            if compute_dtype == torch.float32
            else torch.empty(rows, w.shape[0], dtype=torch.float32, device=x.device)
        )
        for start in range(0, x.shape[0], chunk_size):
            end = min(start + chunk_size, x.shape[0])
            x_c, t_c, m_c = x[start:end], targets[start:end], mask[start:end]
            logits = torch.mm(x_c, w.T, out=buf[: end - start])
            if buf32 is not buf:
                logits = buf32[: end - start].copy_(logits)
            target_logit = logits.gather(1, t_c.unsqueeze(1)).squeeze(1)
            row_max = logits.amax(1, keepdim=True)
            probs = logits.sub_(row_max).exp_()
            sum_exp = probs.sum(1, keepdim=True)
            lse = (row_max + sum_exp.log()).squeeze(1)
            losses[start:end] = (lse - target_logit) * m_c
            if grad_x is not None or grad_w is not None:
                # d(sum_t m_t * ce_t)/d logits = m_t * (softmax - onehot)
                grad_logits = probs.div_(sum_exp)
                grad_logits.scatter_add_(
                    1, t_c.unsqueeze(1), torch.full_like(target_logit, -1.0).unsqueeze(1)
                )
                grad_logits = grad_logits.mul_(m_c.unsqueeze(1))
                if buf32 is not buf:
                    grad_logits = buf[: end - start].copy_(grad_logits)
                if grad_x is not None:
                    torch.mm(grad_logits, w, out=grad_x[start:end])
                if grad_w is not None:
                    grad_w.addmm_(grad_logits.T.float(), x_c.float())  # fp32 accumulation
                del grad_logits
            del logits, probs
        ctx.save_for_backward(grad_x, grad_w, mask)
        ctx.dtypes = (features.dtype, weight.dtype)
        return losses

    @staticmethod
    def backward(ctx: Any, grad_losses: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        grad_x, grad_w, mask = ctx.saved_tensors
        # The forward assumed one weight for every loss token; read it off the incoming
        # gradient without a host sync (mean over the loss tokens).
        scale = (grad_losses * mask).sum() / mask.sum().clamp_min(1)
        dx = (
            (grad_x * grad_losses.unsqueeze(1).to(grad_x.dtype)).to(ctx.dtypes[0])
            if grad_x is not None
            else None
        )
        dw = (grad_w * scale).to(ctx.dtypes[1]) if grad_w is not None else None
        return dx, dw, None, None, None, None


def chunked_cross_entropy(
    features: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    mask: torch.Tensor,
    chunk_size: int = 1024,
) -> torch.Tensor:
    """Per-token ``mask * cross_entropy(features @ weight.T, targets)``, in fp32, computed
    ``chunk_size`` tokens at a time.

    ``features`` (..., C) are the final-norm outputs, ``weight`` (V, C) the lm_head weight
    (the embedding when tied), ``targets`` and ``mask`` (...) the next tokens and the loss mask.
    Returns losses shaped like ``targets``, zero where the mask is. Under autocast the matmuls
    run in the autocast dtype (as the plain lm_head would) and the softmax in fp32.
    The gradient is exact for any loss that is a common multiple of the returned losses' sum.
    """
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    compute_dtype = features.dtype
    if torch.is_autocast_enabled(features.device.type):
        compute_dtype = torch.get_autocast_dtype(features.device.type)
    shape = targets.shape
    with torch.autocast(features.device.type, enabled=False):
        losses = _ChunkedCrossEntropy.apply(
            features.reshape(-1, features.shape[-1]),
            weight,
            targets.reshape(-1),
            mask.reshape(-1).to(torch.float32),
            chunk_size,
            compute_dtype,
        )
    return losses.view(shape)


def cross_entropy(
    features: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """The plain reference: full logits, then ``F.cross_entropy`` in fp32, times the mask."""
    logits = F.linear(features, weight)
    ce = F.cross_entropy(logits.flatten(0, -2).float(), targets.flatten(), reduction="none")
    return ce.view_as(targets) * mask.to(ce.dtype)
