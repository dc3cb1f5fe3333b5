"""A decoder-only transformer (GPT-NeoX / Pythia layout, with a LLaMA-style option).

Plain PyTorch on purpose: no Lightning and no distributed code, so the model can be built,
tested and inspected on its own. The Lightning module wraps it in ``midtrain.train``."""

from __future__ import annotations

import math
import zlib

import torch
import torch.nn as nn
import torch.nn.functional as F

from midtrain.model.config import ModelConfig


def build_rope_cache(
    seq_len: int, rotary_dims: int, base: float = 10000.0, device: torch.device | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables of shape (seq_len, rotary_dims), GPT-NeoX layout (freqs repeated twice)."""
    # Always float32: building the angles in bf16 would wreck positions beyond a few hundred.
    inv_freq = 1.0 / base ** (
        torch.arange(0, rotary_dims, 2, device=device, dtype=torch.float32) / rotary_dims
    )
    t = torch.arange(seq_len, device=device, dtype=torch.float32)
    freqs = torch.outer(t, inv_freq)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


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
        self.n_head = config.n_head
        self.head_size = config.head_size
        self.qkv = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: torch.Tensor | None = None,
        kv_cache: KVCache | None = None,
    ) -> torch.Tensor:
        B, T, C = x.shape
        # GPT-NeoX packs qkv per head ([q_h | k_h | v_h] for each head h), which keeps
        # HF Pythia checkpoints loadable without reshuffling the fused weight.
        qkv = self.qkv(x).view(B, T, self.n_head, 3 * self.head_size).transpose(1, 2)
        q, k, v = qkv.split(self.head_size, dim=-1)
        q = apply_rope(q, cos, sin)
        k = apply_rope(k, cos, sin)
        if kv_cache is not None:  # decoding: attend to every cached key as well
            k, v = kv_cache.update(k, v)
        if mask is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:  # packed sequences: causal within each document only
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.proj(y.transpose(1, 2).reshape(B, T, C))


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
        shape = (batch_size, c.n_head, max_len, c.head_size)
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
        attention score and value matmuls. Used as the numerator of MFU.
        """
        if seq_len <= 0:
            raise ValueError(f"seq_len must be positive, got {seq_len}")
        n_matmul = sum(m.weight.numel() for m in self.modules() if isinstance(m, nn.Linear))
        c = self.config
        return float(6 * n_matmul + 12 * c.n_layer * c.n_embd * seq_len)
