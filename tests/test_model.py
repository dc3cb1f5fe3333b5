from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from midtrain.model.config import PRESETS, ModelConfig
from midtrain.model.gpt import GPT, apply_rope, build_rope_cache

PYTHIA_COUNTS = {
    "pythia-70m": 70_426_624,
    "pythia-160m": 162_322_944,
    "pythia-410m": 405_334_016,
    "pythia-1b": 1_011_781_632,
}
PYTHIA_NAMES = [n for n in PRESETS if n.startswith("pythia-")]


def _neox_formula(c: ModelConfig) -> int:
    V, d, L = c.padded_vocab_size, c.n_embd, c.n_layer
    return 2 * V * d + L * (12 * d * d + 13 * d) + 2 * d


def _meta_gpt(config: ModelConfig) -> GPT:
    with torch.device("meta"):
        return GPT(config)


@pytest.mark.parametrize("name", PYTHIA_NAMES)
def test_pythia_param_counts(name: str) -> None:
    config = ModelConfig.from_name(name)
    model = _meta_gpt(config)
    n = sum(p.numel() for p in model.parameters())
    assert n == model.num_parameters() == _neox_formula(config)
    if name in PYTHIA_COUNTS:
        assert n == PYTHIA_COUNTS[name]
    assert model.embed.weight.is_meta  # nothing was materialized


def test_all_known_counts_covered() -> None:
    assert set(PYTHIA_COUNTS) <= set(PYTHIA_NAMES)
    assert {"pythia-14m", "pythia-31m"} <= set(PYTHIA_NAMES)


def test_flops_per_token_pythia_70m() -> None:
    model = _meta_gpt(ModelConfig.from_name("pythia-70m"))
    d, L, V = 512, 6, 50304
    expected = 6 * (L * 12 * d * d + V * d) + 12 * L * d * 2048
    assert model.flops_per_token(2048) == expected == 343_277_568


def _loss(model: GPT, batch: torch.Tensor) -> torch.Tensor:
    logits = model(batch[:, :-1])
    return F.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten())


@pytest.mark.parametrize("name", ["tiny", "llama-tiny"])
def test_forward_backward_and_training(name: str) -> None:
    torch.manual_seed(0)
    config = ModelConfig.from_name(name)
    model = GPT(config)
    batch = torch.randint(0, config.vocab_size, (4, 33))

    logits = model(batch[:, :-1])
    assert logits.shape == (4, 32, config.padded_vocab_size)
    assert torch.isfinite(logits).all()

    loss = _loss(model, batch)
    # A fresh model should be close to uniform over the (padded) vocab.
    assert abs(loss.item() - math.log(config.padded_vocab_size)) < 0.5
    loss.backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None, pname
        assert torch.isfinite(p.grad).all(), pname
        assert p.grad.abs().sum() > 0, pname

    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    losses = []
    for _ in range(8):
        opt.zero_grad(set_to_none=True)
        loss = _loss(model, batch)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 1.0, losses


@pytest.mark.parametrize("name", ["tiny", "llama-tiny"])
def test_causality(name: str) -> None:
    torch.manual_seed(0)
    config = ModelConfig.from_name(name)
    model = GPT(config).eval()
    idx = torch.randint(0, config.vocab_size, (2, 16))
    t = 7
    changed = idx.clone()
    changed[:, t] = (changed[:, t] + 1) % config.vocab_size
    with torch.no_grad():
        a, b = model(idx), model(changed)
    torch.testing.assert_close(a[:, :t], b[:, :t], rtol=0, atol=1e-6)
    assert not torch.allclose(a[:, t], b[:, t])


def test_rotary_partial_dims() -> None:
    config = ModelConfig.from_name("tiny")
    assert config.rotary_pct == 0.25
    hs, rot = config.head_size, config.rotary_dims
    assert rot == hs // 4 == 4
    T = 8
    cos, sin = build_rope_cache(T, rot, config.rotary_base)
    assert cos.shape == sin.shape == (T, rot)

    torch.manual_seed(0)
    x = torch.randn(2, config.n_head, T, hs)
    y = apply_rope(x, cos, sin)
    assert torch.equal(y[..., rot:], x[..., rot:])  # pass-through dims untouched
    torch.testing.assert_close(y[:, :, 0], x[:, :, 0])  # position 0 is the identity
    assert (y[:, :, 1:, :rot] - x[:, :, 1:, :rot]).abs().amax(dim=-1).min() > 1e-4

    # Reference: rotate_half pairs dim j with j + rot/2 and turns it by pos * inv_freq[j].
    half = rot // 2
    inv_freq = config.rotary_base ** (-torch.arange(0, rot, 2, dtype=torch.float64) / rot)
    angle = torch.arange(T, dtype=torch.float64)[:, None] * inv_freq
    z = torch.complex(x[..., :half].double(), x[..., half:rot].double()) * torch.polar(
        torch.ones_like(angle), angle
    )
    torch.testing.assert_close(y[..., :half].double(), z.real, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(y[..., half:rot].double(), z.imag, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "name,overrides",
    [("tiny", {}), ("llama-tiny", {}), ("tiny", {"tie_embeddings": True})],
)
def test_meta_init_matches_direct_init(name: str, overrides: dict) -> None:
    config = ModelConfig.from_name(name, **overrides)
    torch.manual_seed(123)
    direct = GPT(config)

    torch.manual_seed(123)
    model = _meta_gpt(config)
    model.to_empty(device="cpu")
    model.reset_parameters()

    assert not any(p.is_meta for p in model.parameters())
    if config.tie_embeddings:
        assert model.lm_head.weight is model.embed.weight
        assert model.num_parameters() == direct.num_parameters()
    for (n1, p1), (n2, p2) in zip(
        direct.state_dict().items(), model.state_dict().items(), strict=True
    ):
        assert n1 == n2
        assert torch.equal(p1, p2), n1
    torch.testing.assert_close(model.rope_cos, direct.rope_cos, rtol=0, atol=0)
    torch.testing.assert_close(model.rope_sin, direct.rope_sin, rtol=0, atol=0)

    idx = torch.randint(0, config.vocab_size, (2, 16))
    with torch.no_grad():
        out = model(idx)
        assert torch.isfinite(out).all()
        assert torch.equal(out, direct(idx))


def test_init_stds() -> None:
    config = ModelConfig(n_embd=512, n_layer=6, n_head=8, vocab_size=1024, block_size=64)
    torch.manual_seed(0)
    model = GPT(config)
    d, L = config.n_embd, config.n_layer
    std = math.sqrt(2 / (5 * d))
    out_std = 2 / (L * math.sqrt(d))

    def check(w: torch.Tensor, expected: float, what: str) -> None:
        got = w.std().item()
        assert abs(got - expected) / expected < 0.05, (what, got, expected)
        assert abs(w.mean().item()) < 0.05 * expected, what

    check(model.embed.weight, std, "embed")
    check(model.lm_head.weight, std, "lm_head")
    for i, block in enumerate(model.blocks):
        check(block.attn.qkv.weight, std, f"blocks.{i}.attn.qkv")
        check(block.mlp.fc.weight, std, f"blocks.{i}.mlp.fc")
        check(block.attn.proj.weight, out_std, f"blocks.{i}.attn.proj")
        check(block.mlp.proj.weight, out_std, f"blocks.{i}.mlp.proj")
    for name, p in model.named_parameters():
        if name.endswith(".bias"):
            assert torch.count_nonzero(p) == 0, name
        elif name.startswith("norm_f") or ".norm_" in name:
            assert torch.equal(p, torch.ones_like(p)), name


def test_from_name_errors() -> None:
    with pytest.raises(ValueError, match="pythia-7b"):
        ModelConfig.from_name("pythia-7b")
    with pytest.raises(ValueError, match="n_layers"):
        ModelConfig.from_name("tiny", n_layers=3)
    with pytest.raises(ValueError, match="n_embd"):
        ModelConfig.from_name("tiny", n_embd=65)
    with pytest.raises(ValueError, match="n_embd"):
        GPT(ModelConfig(n_embd=100, n_head=8))
    with pytest.raises(ValueError, match="n_layer"):
        ModelConfig.from_name("tiny", n_layer=0)
    with pytest.raises(ValueError, match="rotary_pct"):
        ModelConfig.from_name("tiny", rotary_pct=3 / 16)  # head_size 16 -> 3 rotary dims (odd)
    with pytest.raises(ValueError, match="rotary_pct"):
        ModelConfig.from_name("tiny", rotary_pct=1.5)
    with pytest.raises(ValueError, match="norm"):
        ModelConfig.from_name("tiny", norm="batchnorm")


def test_overrides_apply() -> None:
    config = ModelConfig.from_name("pythia-70m", block_size=512, vocab_size=50277)
    assert config.name == "pythia-70m"
    assert config.block_size == 512
    assert config.padded_vocab_size == 50304
    assert config.n_embd == 512
    assert ModelConfig.from_name("llama-tiny").mlp_hidden_size == 172
    assert ModelConfig.from_name("tiny").mlp_hidden_size == 256


def test_sequence_longer_than_block_size() -> None:
    config = ModelConfig.from_name("tiny", block_size=8)
    model = GPT(config)
    model(torch.zeros(1, 8, dtype=torch.long))
    with pytest.raises(ValueError, match="block_size"):
        model(torch.zeros(1, 9, dtype=torch.long))


@pytest.mark.parametrize("name", ["tiny", "llama-tiny"])
def test_packed_documents_equal_separate_forwards(name: str) -> None:
    torch.manual_seed(0)
    model = GPT(ModelConfig.from_name(name)).eval()
    a = torch.randint(0, 512, (1, 7))
    b = torch.randint(0, 512, (1, 5))
    packed = torch.cat([a, b], dim=1)
    doc_ids = torch.tensor([[0] * 7 + [1] * 5])
    with torch.no_grad():
        out = model(packed, doc_ids=doc_ids)
        assert torch.allclose(out[:, :7], model(a), atol=1e-5)
        assert torch.allclose(out[:, 7:], model(b), atol=1e-5)
        # without doc ids the second document would see the first
        assert not torch.allclose(model(packed)[:, 7:], model(b), atol=1e-3)
