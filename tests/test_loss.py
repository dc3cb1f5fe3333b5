"""Chunked cross-entropy (``midtrain.model.loss``) against the plain full-logits loss, and the
CausalLM paths that use it (chunked, plain, compiled)."""

from __future__ import annotations

import pytest
import torch

from midtrain import CausalLM
from midtrain.model.loss import chunked_cross_entropy, cross_entropy


def _inputs(n_tokens: int = 37, dim: int = 24, vocab: int = 103, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    features = torch.randn(3, n_tokens, dim, generator=g, dtype=torch.float64)
    weight = torch.randn(vocab, dim, generator=g, dtype=torch.float64) * 0.5
    targets = torch.randint(0, vocab, (3, n_tokens), generator=g)
    mask = (torch.rand(3, n_tokens, generator=g) > 0.3).float()
    mask[1] = 0.0  # a row with no loss tokens at all
    return features, weight, targets, mask


def _loss_and_grads(fn, features, weight, targets, mask, reduce):
    x = features.clone().requires_grad_()
    w = weight.clone().requires_grad_()
    losses = fn(x, w, targets, mask)
    reduce(losses, mask).backward()
    return losses.detach(), x.grad, w.grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("chunk_size", [1, 16, 50, 1000])  # 1000 > N: a single chunk
@pytest.mark.parametrize(
    "reduce",
    [
        lambda losses, mask: losses.sum() / mask.sum().clamp_min(1),  # CausalLM's training loss
        lambda losses, mask: losses.sum() * 3.0 / 8,  # gradient accumulation scales it
    ],
    ids=["mean", "scaled-sum"],
)
def test_chunked_equals_plain_loss_and_grads(dtype, chunk_size, reduce) -> None:
    features, weight, targets, mask = (
        t.to(dtype) if t.is_floating_point() else t for t in _inputs()
    )
    plain = _loss_and_grads(cross_entropy, features, weight, targets, mask, reduce)
    chunked = _loss_and_grads(
        lambda *a: chunked_cross_entropy(*a, chunk_size=chunk_size),
        features,
        weight,
        targets,
        mask,
        reduce,
    )
    assert chunked[0].dtype == torch.float32  # the loss is fp32 whatever the inputs
    for a, b in zip(plain, chunked, strict=True):
        assert a.shape == b.shape
        assert torch.allclose(a.double(), b.double(), rtol=1e-6, atol=1e-6)
    assert (chunked[0][mask == 0] == 0).all()
    assert (chunked[1][1] == 0).all()  # no loss token in row 1: no gradient into it


def test_tied_weight_gets_both_gradients() -> None:
    """With tied embeddings the head weight is the embedding: its gradient is the sum of the
    lookup's and the head's, as with the plain loss."""
    features, weight, targets, mask = (
        t.float() if t.is_floating_point() else t for t in _inputs(dim=16, vocab=50)
    )
    idx = targets.roll(1, 1)
    grads = []
    for fn in (cross_entropy, lambda *a: chunked_cross_entropy(*a, chunk_size=7)):
        w = weight.clone().requires_grad_()
        x = torch.nn.functional.embedding(idx, w) + features
        losses = fn(x, w, targets, mask)
        (losses.sum() / mask.sum()).backward()
        grads.append(w.grad)
    assert torch.allclose(grads[0], grads[1], rtol=1e-6, atol=1e-6)


def test_no_grad_and_bad_chunk_size() -> None:
    features, weight, targets, mask = _inputs()
    with torch.no_grad():
        out = chunked_cross_entropy(features.float(), weight.float(), targets, mask, 8)
    assert not out.requires_grad
    assert torch.allclose(out, cross_entropy(features, weight, targets, mask).float(), atol=1e-6)
    with pytest.raises(ValueError, match="chunk_size"):
        chunked_cross_entropy(features, weight, targets, mask, 0)


def test_bf16_autocast_runs_matmuls_in_bf16() -> None:
    """Under autocast the head matmul runs in bf16 as the plain lm_head would; the loss and
    softmax stay fp32. Same result as the plain path under the same autocast."""
    features, weight, targets, mask = (t.float() if t.is_floating_point() else t for t in _inputs())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        plain = _loss_and_grads(
            cross_entropy, features, weight, targets, mask, lambda losses, m: losses.sum() / m.sum()
        )
        chunked = _loss_and_grads(
            lambda *a: chunked_cross_entropy(*a, chunk_size=16),
            features,
            weight,
            targets,
            mask,
            lambda losses, m: losses.sum() / m.sum(),
        )
    assert chunked[1].dtype == chunked[2].dtype == torch.float32  # grads in the inputs' dtype
    for a, b in zip(plain, chunked, strict=True):
        assert torch.allclose(a.float(), b.float(), rtol=2e-2, atol=2e-2)


def _lm(**kwargs) -> CausalLM:
    torch.manual_seed(0)
    lm = CausalLM(arch="tiny", vocab_size=512, **kwargs)
    lm.configure_model()
    return lm


@pytest.mark.parametrize("tie", [False, True])
def test_causal_lm_chunked_and_plain_agree(tie: bool) -> None:
    chunked = _lm(loss_chunk_size=40, model_config={"tie_embeddings": tie})
    plain = _lm(loss_chunk_size=0, model_config={"tie_embeddings": tie})
    assert chunked._chunked_loss and not plain._chunked_loss
    plain.model.load_state_dict(chunked.model.state_dict())
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, 512, (2, 65), generator=g)
    mask = torch.ones(2, 64)
    mask[0, :20] = 0  # a masked prompt
    batch = {"input_ids": x[:, :-1], "targets": x[:, 1:], "loss_mask": mask}
    results = []
    for lm in (plain, chunked):
        losses, m = lm._token_losses(batch)
        (losses.sum() / m.sum()).backward()
        results.append((losses.detach(), [p.grad for p in lm.model.parameters()]))
    assert torch.allclose(results[0][0], results[1][0], rtol=1e-6, atol=1e-6)
    for a, b in zip(results[0][1], results[1][1], strict=True):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-7)


def test_bad_loss_chunk_size_is_refused() -> None:
    from midtrain.errors import MidtrainError

    with pytest.raises(MidtrainError, match="model.loss_chunk_size"):
        CausalLM(arch="tiny", loss_chunk_size=-1)


def test_fused_adamw_on_cpu() -> None:
    from midtrain.train.optim import fused_adamw_supported

    assert fused_adamw_supported(_lm().model) is True


@pytest.mark.slow  # inductor compiles C++ on CPU: a minute or more on a loaded machine
def test_compiled_trunk_matches_eager_and_trains() -> None:
    eager, compiled = _lm(loss_chunk_size=64), _lm(loss_chunk_size=64, compile=True)
    compiled.model.load_state_dict(eager.model.state_dict())
    # compiled in place: parameter names, and so checkpoints, are unchanged
    assert list(compiled.model.state_dict()) == list(eager.model.state_dict())
    g = torch.Generator().manual_seed(2)
    x = torch.randint(0, 512, (4, 65), generator=g)
    batch = {"input_ids": x[:, :-1], "targets": x[:, 1:], "loss_mask": torch.ones(4, 64)}
    opt = torch.optim.AdamW(compiled.model.parameters(), lr=1e-2)
    first = None
    for step in range(6):
        losses, mask = compiled._token_losses(batch)
        loss = losses.sum() / mask.sum()
        if step == 0:
            ref, _ = eager._token_losses(batch)
            assert torch.allclose(losses.detach(), ref.detach(), rtol=1e-4, atol=1e-4)
            first = loss.item()
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert loss.item() < first - 0.5  # it learns the batch
