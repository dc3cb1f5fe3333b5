from __future__ import annotations

import math
import re

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


# -- Llama-family features: GQA, head_dim, q/k/v bias, QK-norm, post-norm, Llama 3 rope ------

# The released models' parameter counts (their config.json numbers; tied heads count once).
RELEASED_COUNTS = {
    "smollm2-135m": 134_515_008,
    "smollm2-360m": 361_821_120,
    "qwen3-0.6b": 596_049_920,
    "llama-3.2-1b": 1_235_814_400,
    "olmo2-1b": 1_484_916_736,
}

LLAMA3_ROPE = dict(
    rope_type="llama3",
    factor=8.0,
    low_freq_factor=1.0,
    high_freq_factor=4.0,
    original_max_position_embeddings=64,
)

# Each a llama-tiny variant (n_embd 64, 4 heads) exercising one architecture's options.
FEATURES = {
    "gqa-llama3": dict(n_query_groups=2, rope_scaling=LLAMA3_ROPE, tie_embeddings=True),
    "mqa": dict(n_query_groups=1),
    "qwen2": dict(n_query_groups=2, bias=False, qkv_bias=True),
    "qwen3": dict(n_query_groups=2, head_dim=24, qk_norm="per_head"),
    "olmo2": dict(n_query_groups=2, qk_norm="whole", norm_placement="post"),
}


def _feature_gpt(feature: str, seed: int = 0) -> GPT:
    """A feature model with noise on every weight (unit norms and zero biases hide bugs)."""
    torch.manual_seed(seed)
    model = GPT(ModelConfig.from_name("llama-tiny", **FEATURES[feature]))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model.eval()


@pytest.mark.parametrize("name", list(RELEASED_COUNTS))
def test_released_base_param_counts(name: str) -> None:
    model = _meta_gpt(ModelConfig.from_name(name))
    assert model.num_parameters() == RELEASED_COUNTS[name]
    assert model.embed.weight.is_meta


def test_attention_shapes() -> None:
    qwen3 = ModelConfig.from_name("qwen3-0.6b")
    attn = _meta_gpt(ModelConfig.from_name("qwen3-0.6b", n_layer=1)).blocks[0].attn
    # 16 query heads and 8 key/value heads of 128 dims over a 1024-wide stream
    assert attn.qkv.weight.shape == ((16 + 2 * 8) * 128, 1024)
    assert attn.proj.weight.shape == (1024, 16 * 128)
    assert attn.q_norm.weight.shape == attn.k_norm.weight.shape == (128,)
    assert qwen3.head_size == 128 and qwen3.kv_heads == 8
    olmo = _meta_gpt(ModelConfig.from_name("olmo2-1b", n_layer=1)).blocks[0].attn
    assert olmo.q_norm.weight.shape == olmo.k_norm.weight.shape == (2048,)
    # a multi-head config keeps Pythia's fused layout: 3 * n_embd rows, no new parameters
    tiny = GPT(ModelConfig.from_name("tiny"))
    assert tiny.blocks[0].attn.qkv.weight.shape == (3 * 64, 64)
    assert not hasattr(tiny.blocks[0].attn, "q_norm")


def test_grouped_query_attention_equals_repeated_heads() -> None:
    """A GQA model computes exactly the multi-head model whose key/value heads are copied to
    every query head of their group (the grouping transformers and Meta use)."""
    gqa = _feature_gpt("gqa-llama3")
    mha_config = ModelConfig.from_name(
        "llama-tiny", **{**FEATURES["gqa-llama3"], "n_query_groups": None}
    )
    mha = GPT(mha_config).eval()
    state = dict(gqa.state_dict())
    hs, groups, per = 16, 2, 2
    for i in range(2):
        for s in ("weight",):
            w = state[f"blocks.{i}.attn.qkv.{s}"].view(groups, per + 2, hs, -1)
            q, k, v = w[:, :per], w[:, per : per + 1], w[:, per + 1 :]
            heads = [
                torch.cat([q[g, j : j + 1], k[g], v[g]]) for g in range(groups) for j in range(per)
            ]
            state[f"blocks.{i}.attn.qkv.{s}"] = torch.cat(heads).reshape(-1, 64)
    mha.load_state_dict(state)
    idx = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(gqa(idx), mha(idx), rtol=0, atol=2e-6)


def test_llama3_rope_scaling() -> None:
    """Low frequencies (wavelength beyond original/low_freq_factor) are divided by factor,
    high ones (below original/high_freq_factor) kept, the band between blended."""
    dims, base = 16, 10000.0
    plain = build_rope_cache(64, dims, base)
    scaled = build_rope_cache(64, dims, base, scaling=LLAMA3_ROPE)
    inv = 1.0 / base ** (torch.arange(0, dims, 2, dtype=torch.float32) / dims)
    wavelen = 2 * math.pi / inv
    angle_plain, angle_scaled = plain[1][1, : dims // 2].asin(), scaled[1][1, : dims // 2].asin()
    high, low = wavelen < 64 / 4, wavelen > 64 / 1
    assert high.any() and low.any() and (~high & ~low).any()  # all three bands are exercised
    torch.testing.assert_close(angle_scaled[high], angle_plain[high])
    torch.testing.assert_close(angle_scaled[low], angle_plain[low] / 8.0)
    mid = ~high & ~low
    assert (
        (angle_scaled[mid] < angle_plain[mid]) & (angle_scaled[mid] > angle_plain[mid] / 8)
    ).all()


@pytest.mark.parametrize("feature", list(FEATURES))
def test_features_train_and_stay_causal(feature: str) -> None:
    model = _feature_gpt(feature).train()
    batch = torch.randint(0, 512, (4, 33), generator=torch.Generator().manual_seed(0))
    loss = _loss(model, batch)
    loss.backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, pname
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    losses = []
    for _ in range(6):
        opt.zero_grad(set_to_none=True)
        loss = _loss(model, batch)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.5, losses
    model.eval()
    changed = batch.clone()
    changed[:, 7] = (changed[:, 7] + 1) % 512
    with torch.no_grad():
        a, b = model(batch), model(changed)
    torch.testing.assert_close(a[:, :7], b[:, :7], rtol=0, atol=1e-6)
    assert not torch.allclose(a[:, 7], b[:, 7])


@pytest.mark.parametrize("feature", list(FEATURES))
def test_features_packed_documents_and_kv_cache(feature: str) -> None:
    from midtrain.model.generation import Sampling, generate_ids

    model = _feature_gpt(feature)
    a = torch.randint(0, 512, (1, 7), generator=torch.Generator().manual_seed(2))
    b = torch.randint(0, 512, (1, 5), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        out = model(torch.cat([a, b], dim=1), doc_ids=torch.tensor([[0] * 7 + [1] * 5]))
        assert torch.allclose(out[:, :7], model(a), atol=1e-5)
        assert torch.allclose(out[:, 7:], model(b), atol=1e-5)
    # the cache holds kv_heads heads, and cached decoding (batched, left-padded) equals
    # recomputing every sequence in full
    cache = model.new_kv_cache(2, 8)
    assert cache[0].k.shape == (2, model.config.kv_heads, 8, model.config.head_size)
    prompts = [a[0].tolist(), b[0, :3].tolist()]
    sampling = Sampling(max_new_tokens=12)
    assert generate_ids(model, prompts, sampling) == generate_ids(
        model, prompts, sampling, use_cache=False
    )


@pytest.mark.parametrize("feature", ["qwen3", "olmo2"])
def test_features_meta_init_and_activation_checkpointing(feature: str) -> None:
    from midtrain.model.parallelize import apply_activation_checkpointing

    config = ModelConfig.from_name("llama-tiny", **FEATURES[feature])
    torch.manual_seed(5)
    direct = GPT(config)
    torch.manual_seed(5)
    meta = _meta_gpt(config)
    meta.to_empty(device="cpu")
    meta.reset_parameters()
    for (n1, p1), (_, p2) in zip(
        direct.state_dict().items(), meta.state_dict().items(), strict=True
    ):
        assert torch.equal(p1, p2), n1
    # checkpointing recomputes activations: the same gradients, bitwise
    batch = torch.randint(0, 512, (2, 17), generator=torch.Generator().manual_seed(0))
    _loss(direct, batch).backward()
    apply_activation_checkpointing(meta)
    _loss(meta, batch).backward()
    for (name, p1), p2 in zip(direct.named_parameters(), meta.parameters(), strict=True):
        assert torch.equal(p1.grad, p2.grad), name


@pytest.mark.parametrize(
    "overrides,message",
    [
        ({"n_query_groups": 3}, "n_query_groups=3: must divide n_head=4"),
        ({"n_query_groups": 0}, "n_query_groups=0: must be None or a positive int"),
        ({"qk_norm": "layer"}, "qk_norm='layer': must be 'none' or 'per_head' or 'whole'"),
        ({"norm_placement": "post", "parallel_residual": True}, "needs parallel_residual=False"),
        ({"rope_scaling": {"rope_type": "yarn", "factor": 2.0}}, "rope_type 'llama3'"),
        ({"rope_scaling": {**LLAMA3_ROPE, "factor": 0}}, "factor must be a positive number"),
        ({"rope_scaling": {**LLAMA3_ROPE, "beta": 1.0}}, "unknown key 'beta'"),
        ({"head_dim": 0}, "head_dim=0"),
        ({"n_embd": 66}, "set head_dim"),
    ],
)
def test_feature_config_errors(overrides: dict, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        ModelConfig.from_name("llama-tiny", **overrides)
    ModelConfig.from_name("llama-tiny", n_embd=66, head_dim=16)  # head_dim frees n_embd


def test_shape_record_omits_new_fields_at_defaults() -> None:
    """A checkpoint recorded before the Llama-family fields existed compares equal on resume."""
    assert "n_query_groups" not in ModelConfig.from_name("tiny").shape()
    assert ModelConfig.from_name("qwen3-0.6b").shape()["qk_norm"] == "per_head"
