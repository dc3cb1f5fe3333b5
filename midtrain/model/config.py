"""The model's shape: ``ModelConfig`` and the named presets (Pythia, Llama-style, test
shapes). Plain Python: nothing here builds a tensor."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Literal

_PYTHIA: dict[str, Any] = dict(
    vocab_size=50304,
    block_size=2048,
    rotary_pct=0.25,
    parallel_residual=True,
    norm="layernorm",
    norm_eps=1e-5,
    mlp="gelu",
    bias=True,
    tie_embeddings=False,
)


_LLAMA: dict[str, Any] = dict(
    norm="rmsnorm",
    mlp="swiglu",
    bias=False,
    rotary_pct=1.0,
    parallel_residual=False,
)


PRESETS: dict[str, dict[str, Any]] = {
    "pythia-14m": dict(_PYTHIA, n_embd=128, n_layer=6, n_head=4),
    "pythia-31m": dict(_PYTHIA, n_embd=256, n_layer=6, n_head=8),
    "pythia-70m": dict(_PYTHIA, n_embd=512, n_layer=6, n_head=8),
    "pythia-160m": dict(_PYTHIA, n_embd=768, n_layer=12, n_head=12),
    "pythia-410m": dict(_PYTHIA, n_embd=1024, n_layer=24, n_head=16),
    "pythia-1b": dict(_PYTHIA, n_embd=2048, n_layer=16, n_head=8),
    # Small shapes for unit tests and smoke runs.
    "tiny": dict(_PYTHIA, n_embd=64, n_layer=2, n_head=4, block_size=256, vocab_size=512),
    "llama-tiny": dict(
        _LLAMA,
        n_embd=64,
        n_layer=2,
        n_head=4,
        block_size=256,
        vocab_size=512,
        intermediate_size=172,
    ),
}


@dataclass
class ModelConfig:
    name: str = "custom"
    vocab_size: int = 50304  # tokenizer vocab; the embedding uses padded_vocab_size
    pad_vocab_multiple: int = 128
    block_size: int = 2048  # max context length
    n_layer: int = 6
    n_head: int = 8
    n_embd: int = 512
    intermediate_size: int | None = None  # MLP hidden size; None means 4 * n_embd
    rotary_pct: float = 0.25  # fraction of each head's dims that get rotary embeddings
    rotary_base: float = 10000.0
    parallel_residual: bool = True  # x + attn(norm_1(x)) + mlp(norm_2(x)), as in GPT-NeoX
    norm: Literal["layernorm", "rmsnorm"] = "layernorm"
    norm_eps: float = 1e-5
    mlp: Literal["gelu", "swiglu"] = "gelu"
    bias: bool = True
    tie_embeddings: bool = False

    @property
    def padded_vocab_size(self) -> int:
        # Rounding the vocab up keeps the embedding / lm_head matmuls on friendly shapes.
        m = self.pad_vocab_multiple
        return -(-self.vocab_size // m) * m

    @property
    def head_size(self) -> int:
        return self.n_embd // self.n_head

    @property
    def rotary_dims(self) -> int:
        return int(self.head_size * self.rotary_pct)

    @property
    def mlp_hidden_size(self) -> int:
        # A property (not resolved once in __post_init__) so it follows later n_embd edits.
        return self.intermediate_size if self.intermediate_size is not None else 4 * self.n_embd

    @classmethod
    def from_name(cls, name: str, **overrides: Any) -> ModelConfig:
        if name not in PRESETS:
            raise ValueError(f"unknown model preset {name!r}; known presets: {', '.join(PRESETS)}")
        known = {f.name for f in fields(cls)}
        for key in overrides:
            if key not in known:
                raise ValueError(f"unknown ModelConfig field {key!r} in overrides for {name!r}")
        config = cls(**{"name": name, **PRESETS[name], **overrides})
        config.validate()
        return config

    def validate(self) -> None:
        def fail(field: str, why: str) -> None:
            raise ValueError(f"ModelConfig.{field}={getattr(self, field)!r}: {why}")

        for field in (
            "vocab_size",
            "pad_vocab_multiple",
            "block_size",
            "n_layer",
            "n_head",
            "n_embd",
        ):
            value = getattr(self, field)
            # bool is an int subclass; reject it so `n_layer=True` is not silently 1.
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                fail(field, "must be a positive int")
        if self.intermediate_size is not None and (
            not isinstance(self.intermediate_size, int)
            or isinstance(self.intermediate_size, bool)
            or self.intermediate_size <= 0
        ):
            fail("intermediate_size", "must be None or a positive int")
        if self.n_embd % self.n_head != 0:
            fail("n_embd", f"must be divisible by n_head={self.n_head}")
        if not 0.0 <= self.rotary_pct <= 1.0:
            fail("rotary_pct", "must be in [0, 1]")
        if self.rotary_dims % 2 != 0:
            fail(
                "rotary_pct",
                f"gives odd rotary_dims={self.rotary_dims} "
                f"(head_size={self.head_size}); rotary needs an even number of dims",
            )
        if not self.rotary_base > 0:
            fail("rotary_base", "must be > 0")
        if not self.norm_eps > 0:
            fail("norm_eps", "must be > 0")
        if self.norm not in ("layernorm", "rmsnorm"):
            fail("norm", "must be 'layernorm' or 'rmsnorm'")
        if self.mlp not in ("gelu", "swiglu"):
            fail("mlp", "must be 'gelu' or 'swiglu'")
