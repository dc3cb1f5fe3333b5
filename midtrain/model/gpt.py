"""A decoder-only transformer: the GPT-NeoX / Pythia layout, and the Llama-family options
(grouped-query attention, q/k/v bias, QK-norm, post-norm, Llama 3 rotary scaling).

Plain PyTorch on purpose: no Lightning and no distributed code, so the model can be built,
tested and inspected on its own. The Lightning module wraps it in ``midtrain.train``."""

from __future__ import annotations

import math
import zlib
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from midtrain.model.config import ModelConfig


def build_rope_cache(
    seq_len: int,
    rotary_dims: int,
    base: float = 10000.0,
    device: torch.device | None = None,
    scaling: dict[str, Any] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables of shape (seq_len, rotary_dims), GPT-NeoX layout (freqs repeated twice);
    ``scaling`` is a Llama 3 ``rope_scaling`` dict (``ModelConfig.rope_scaling``) or None."""
    # Always float32: building the angles in bf16 would wreck positions beyond a few hundred.
    inv_freq = 1.0 / base ** (
        torch.arange(0, rotary_dims, 2, device=device, dtype=torch.float32) / rotary_dims
    )
    if scaling is not None:
        inv_freq = _llama3_inv_freq(inv_freq, scaling)
    t = torch.arange(seq_len, device=device, dtype=torch.float32)
    freqs = torch.outer(t, inv_freq)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


def _llama3_inv_freq(inv_freq: torch.Tensor, s: dict[str, Any]) -> torch.Tensor:
    """Llama 3's rotary scaling: low frequencies slowed by ``factor``, high ones kept, and a
    smooth blend between (the formula of Meta's reference code, as transformers has it)."""
    factor, low, high = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
    old_len = s["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < old_len / high) * ~(wavelen > old_len / low)
    return torch.where(medium, smoothed, scaled)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the first cos.size(-1) dims of x (..., T, head_size); the rest pass through.

    Uses the non-interleaved "rotate_half" convention, so dim j pairs with dim j + rot/2.
    """
    rot = cos.size(-1)
    if rot == 0:
        return x
    x_rot, x_pass = x[..., :rot], x[..., rot:]
    x1, x2 = x_rot.chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)
    x_rot = (x_rot * cos + rotated * sin).to(x.dtype)
    return torch.cat((x_rot, x_pass), dim=-1)


def _make_norm(config: ModelConfig) -> nn.Module:
    if config.norm == "rmsnorm":
        return nn.RMSNorm(config.n_embd, eps=config.norm_eps)
    return nn.LayerNorm(config.n_embd, eps=config.norm_eps, bias=config.bias)


class KVCache:
    """Keys and values of one attention layer for incremental decoding, preallocated (B, H,
    max_len, head_size); ``update`` appends the new tokens' and returns everything so far."""

    def __init__(self, k: torch.Tensor, v: torch.Tensor) -> None:
        self.k, self.v, self.length = k, v, 0

    def update(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        end = self.length + k.size(2)
        if end > self.k.size(2):
            raise ValueError(f"KV cache full: {end} tokens for room of {self.k.size(2)}")
        self.k[:, :, self.length : end] = k
        self.v[:, :, self.length : end] = v
        self.length = end
        return self.k[:, :, :end], self.v[:, :, :end]


class CausalSelfAttention(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.n_head, self.n_kv = config.n_head, config.kv_heads
        self.head_size = config.head_size
        self.qk_norm = config.qk_norm
        width = config.n_head * config.head_size
        kv_width = config.kv_heads * config.head_size
        self.qkv = nn.Linear(config.n_embd, width + 2 * kv_width, bias=config.has_qkv_bias)
        self.proj = nn.Linear(width, config.n_embd, bias=config.bias)
        if config.qk_norm != "none":  # always RMSNorm: Qwen3 and OLMo 2 both use it
            per_head = config.qk_norm == "per_head"
            self.q_norm = nn.RMSNorm(config.head_size if per_head else width, config.norm_eps)
            self.k_norm = nn.RMSNorm(config.head_size if per_head else kv_width, config.norm_eps)

    def _split(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(B, T, n_embd) -> q (B, n_head, T, hs), k and v (B, n_kv, T, hs).

        The fused weight is laid out per key/value group: [q_g1 .. q_gm | k_g | v_g] for each
        group g of m query heads. With one query per group that is GPT-NeoX's per-head
        [q_h | k_h | v_h], which keeps HF Pythia checkpoints loadable without reshuffling."""
        B, T, _ = x.shape
        hs, per_kv = self.head_size, self.n_head // self.n_kv
        qkv = self.qkv(x).view(B, T, self.n_kv, (per_kv + 2) * hs).transpose(1, 2)
        q, k, v = qkv.split((per_kv * hs, hs, hs), dim=-1)
        if per_kv > 1:  # query heads in order g * per_kv + i, as transformers numbers them
            q = q.reshape(B, self.n_kv, T, per_kv, hs).transpose(2, 3)
            q = q.reshape(B, self.n_head, T, hs)
        if self.qk_norm == "per_head":
            q, k = self.q_norm(q), self.k_norm(k)
        elif self.qk_norm == "whole":
            q, k = self._whole_norm(self.q_norm, q), self._whole_norm(self.k_norm, k)
        return q, k, v

    @staticmethod
    def _whole_norm(norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """RMSNorm over all heads at once (OLMo 2): (B, H, T, hs) in and out."""
        B, H, T, hs = x.shape
        return norm(x.transpose(1, 2).reshape(B, T, H * hs)).view(B, T, H, hs).transpose(1, 2)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: torch.Tensor | None = None,
        kv_cache: KVCache | None = None,
    ) -> torch.Tensor:
        B, T, _ = x.shape
        q, k, v = self._split(x)
        q = apply_rope(q, cos, sin)
        k = apply_rope(k, cos, sin)
        if kv_cache is not None:  # decoding: attend to every cached key as well
            k, v = kv_cache.update(k, v)
        # grouped keys/values are shared by their group's query heads inside SDPA (no copy)
        gqa = self.n_kv != self.n_head
        if mask is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        else:  # packed sequences: causal within each document only
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
        return self.proj(y.transpose(1, 2).reshape(B, T, self.n_head * self.head_size))


class GeluMLP(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.fc = nn.Linear(config.n_embd, config.mlp_hidden_size, bias=config.bias)
        self.proj = nn.Linear(config.mlp_hidden_size, config.n_embd, bias=config.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(F.gelu(self.fc(x)))  # exact erf GELU, as GPT-NeoX uses


class SwiGLUMLP(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.fc_1 = nn.Linear(config.n_embd, config.mlp_hidden_size, bias=config.bias)
        self.fc_2 = nn.Linear(config.n_embd, config.mlp_hidden_size, bias=config.bias)
        self.proj = nn.Linear(config.mlp_hidden_size, config.n_embd, bias=config.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(F.silu(self.fc_1(x)) * self.fc_2(x))


class Block(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.parallel_residual = config.parallel_residual
        self.post_norm = config.norm_placement == "post"
        self.norm_1 = _make_norm(config)
        self.attn = CausalSelfAttention(config)
        self.norm_2 = _make_norm(config)
        self.mlp = SwiGLUMLP(config) if config.mlp == "swiglu" else GeluMLP(config)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: torch.Tensor | None = None,
        kv_cache: KVCache | None = None,
    ) -> torch.Tensor:
        if self.post_norm:  # OLMo 2: norm_1 / norm_2 normalise the outputs, not the inputs
            x = x + self.norm_1(self.attn(x, cos, sin, mask, kv_cache))
            return x + self.norm_2(self.mlp(x))
        if self.parallel_residual:
            return (
                x + self.attn(self.norm_1(x), cos, sin, mask, kv_cache) + self.mlp(self.norm_2(x))
            )
        x = x + self.attn(self.norm_1(x), cos, sin, mask, kv_cache)
        return x + self.mlp(self.norm_2(x))


class GPT(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        config.validate()
        self.config = config
        # Every parameter's initial value is a pure function of (init_seed, its name), so a
        # direct build, a meta build materialised later, and any sharding of it all start from
        # the same weights. The seed comes from the global RNG: seed_everything decides it.
        self.init_seed = int(torch.randint(0, 2**62, (1,), device="cpu").item())
        self.embed = nn.Embedding(config.padded_vocab_size, config.n_embd)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.norm_f = _make_norm(config)
        self.lm_head = nn.Linear(config.n_embd, config.padded_vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        # Non-persistent: derived from the config, so kept out of checkpoints.
        cos, sin = build_rope_cache(
            config.block_size,
            config.rotary_dims,
            config.rotary_base,
            device=self.embed.weight.device,
            scaling=config.rope_scaling,
        )
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        if self.embed.weight.device.type != "meta":
            self.reset_parameters()

    def initial_value(self, name: str, shape: torch.Size | tuple[int, ...]) -> torch.Tensor:
        """GPT-NeoX init of parameter ``name`` ("small_init"; "wang_init" for the residual
        output projections), as a float32 CPU tensor from a generator keyed by its name."""
        config = self.config
        if name.endswith(".bias"):
            return torch.zeros(shape)
        if "norm" in name.split(".")[-2]:
            return torch.ones(shape)  # LayerNorm / RMSNorm weight
        std = math.sqrt(2.0 / (5 * config.n_embd))
        if name.endswith(("attn.proj.weight", "mlp.proj.weight")):
            # they write into the residual stream: shrinking them with depth keeps the
            # residual variance roughly constant across layers
            std = 2.0 / (config.n_layer * math.sqrt(config.n_embd))
        key = (self.init_seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63 - 1)
        return torch.empty(shape).normal_(0.0, std, generator=torch.Generator().manual_seed(key))

    def reset_buffers(self) -> None:
        """Derived buffers (rotary tables) and the embedding tie; safe after to_empty()."""
        config = self.config
        # to_empty() re-creates parameters one module at a time, which silently unties them.
        if config.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        self.rope_cos, self.rope_sin = build_rope_cache(
            config.block_size,
            config.rotary_dims,
            config.rotary_base,
            device=self.embed.weight.device,
            scaling=config.rope_scaling,
        )

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Initialise every parameter to its ``initial_value``; safe after to_empty()."""
        self.reset_buffers()
        for name, p in self.named_parameters():  # a tied lm_head is listed once, as embed
            p.copy_(self.initial_value(name, p.shape).to(p.dtype))

    def forward(self, idx: torch.Tensor, doc_ids: torch.Tensor | None = None) -> torch.Tensor:
        """(B, T) token ids -> (B, T, padded_vocab_size) logits (see ``features``)."""
        return self.lm_head(self.features(idx, doc_ids))

    def features(self, idx: torch.Tensor, doc_ids: torch.Tensor | None = None) -> torch.Tensor:
        """(B, T) token ids -> (B, T, n_embd) final-norm outputs, the lm_head's input.

        ``doc_ids`` (B, T), optional, marks packed documents: attention stays within a
        document and rotary positions restart at each one, so a packed row computes exactly
        what its documents would alone. A loss can take these with ``lm_head.weight`` and never
        build the full logits (``midtrain.model.loss``).
        """
        seq_len = idx.size(1)
        if seq_len > self.config.block_size:
            raise ValueError(
                f"sequence length {seq_len} exceeds block_size {self.config.block_size}"
            )
        mask = None
        if doc_ids is None:
            cos, sin = self.rope_cos[:seq_len], self.rope_sin[:seq_len]
        else:
            t = torch.arange(seq_len, device=idx.device)
            starts = torch.ones_like(doc_ids, dtype=torch.bool)
            starts[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
            first = torch.cummax(torch.where(starts, t, 0), dim=1).values
            pos = t - first  # position within its document
            cos, sin = self.rope_cos[pos].unsqueeze(1), self.rope_sin[pos].unsqueeze(1)
            same = doc_ids[:, :, None] == doc_ids[:, None, :]
            mask = (
                same & torch.ones(seq_len, seq_len, dtype=torch.bool, device=idx.device).tril()
            ).unsqueeze(1)
        x = self.embed(idx)
        for block in self.blocks:
            x = block(x, cos, sin, mask)
        return self.norm_f(x)

    def new_kv_cache(self, batch_size: int, max_len: int) -> list[KVCache]:
        """One empty key/value cache per block for ``forward_cached``, room for max_len tokens."""
        c, w = self.config, self.embed.weight
        shape = (batch_size, c.kv_heads, max_len, c.head_size)  # grouped: the GQA saving
        return [
            KVCache(
                torch.empty(shape, dtype=w.dtype, device=w.device),
                torch.empty(shape, dtype=w.dtype, device=w.device),
            )
            for _ in range(c.n_layer)
        ]

    def forward_cached(
        self,
        idx: torch.Tensor,
        cache: list[KVCache],
        positions: torch.Tensor,
        key_mask: torch.Tensor,
    ) -> torch.Tensor:
        """Incremental decoding: (B, T) new tokens -> (B, T, padded_vocab_size) logits, with
        the keys and values of every earlier token read from ``cache`` (and these appended).

        ``positions`` (B, T) are the tokens' rotary positions; ``key_mask`` (B, L + T) marks
        which cached-plus-new tokens are real (False: left padding of a shorter prompt), so
        each row computes what it would alone. Cost per new token is independent of L.
        """
        T = idx.size(1)
        if int(positions.max()) >= self.config.block_size:
            raise ValueError(
                f"position {int(positions.max())} is beyond block_size {self.config.block_size}"
            )
        total = cache[0].length + T
        causal = torch.ones(T, total, dtype=torch.bool, device=idx.device).tril(total - T)
        # a padding query attends to itself, so no softmax row is empty (NaN would spread)
        self_key = torch.zeros_like(causal)
        self_key[:, total - T :] = torch.eye(T, dtype=torch.bool, device=idx.device)
        mask = ((key_mask[:, None, :] & causal) | self_key).unsqueeze(1)
        cos, sin = self.rope_cos[positions].unsqueeze(1), self.rope_sin[positions].unsqueeze(1)
        x = self.embed(idx)
        for block, kv in zip(self.blocks, cache, strict=True):
            x = block(x, cos, sin, mask, kv)
        return self.lm_head(self.norm_f(x))

    def num_parameters(self, exclude_embeddings: bool = False) -> int:
        """Unique parameter count (a tied embedding counts once)."""
        n = sum(p.numel() for p in self.parameters())
        if exclude_embeddings:
            n -= self.embed.weight.numel()
            if not self.config.tie_embeddings:
                n -= self.lm_head.weight.numel()
        return n

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token (forward + backward), PaLM appendix B style.

        6 * N for every matmul weight (all Linear layers including lm_head; the embedding is a
        lookup, and norms/biases are negligible) plus 12 * n_layer * n_embd * seq_len for the
        attention score and value matmuls (n_head * head_size wide). Used as the numerator of
        MFU.
        """
        if seq_len <= 0:
            raise ValueError(f"seq_len must be positive, got {seq_len}")
        n_matmul = sum(m.weight.numel() for m in self.modules() if isinstance(m, nn.Linear))
        c = self.config
        return float(6 * n_matmul + 12 * c.n_layer * c.n_head * c.head_size * seq_len)
