"""The model's shape: ``ModelConfig`` and the named presets (Pythia, current small bases:
SmolLM2, Qwen3, Llama 3.2, OLMo 2, and test shapes). Plain Python: nothing here builds a tensor."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any, Literal

from midtrain.errors import MidtrainError

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


# The released models' config.json numbers (HF hub ids in docs/interop.md); vocab sizes are
# multiples of 128, so the padded embedding has exactly the released rows.
_SMOLLM2: dict[str, Any] = dict(
    _LLAMA,
    vocab_size=49152,
    block_size=8192,
    rotary_base=100000.0,
    norm_eps=1e-5,
    tie_embeddings=True,
)
_LLAMA3_ROPE: dict[str, Any] = dict(
    rope_type="llama3",
    factor=32.0,
    low_freq_factor=1.0,
    high_freq_factor=4.0,
    original_max_position_embeddings=8192,
)


PRESETS: dict[str, dict[str, Any]] = {
    "pythia-14m": dict(_PYTHIA, n_embd=128, n_layer=6, n_head=4),
    "pythia-31m": dict(_PYTHIA, n_embd=256, n_layer=6, n_head=8),
    "pythia-70m": dict(_PYTHIA, n_embd=512, n_layer=6, n_head=8),
    "pythia-160m": dict(_PYTHIA, n_embd=768, n_layer=12, n_head=12),
    "pythia-410m": dict(_PYTHIA, n_embd=1024, n_layer=24, n_head=16),
    "pythia-1b": dict(_PYTHIA, n_embd=2048, n_layer=16, n_head=8),
    "smollm2-135m": dict(
        _SMOLLM2, n_embd=576, n_layer=30, n_head=9, n_query_groups=3, intermediate_size=1536
    ),
    "smollm2-360m": dict(
        _SMOLLM2, n_embd=960, n_layer=32, n_head=15, n_query_groups=5, intermediate_size=2560
    ),
    "qwen3-0.6b": dict(
        _LLAMA,
        vocab_size=151936,
        block_size=40960,
        n_embd=1024,
        n_layer=28,
        n_head=16,
        n_query_groups=8,
        head_dim=128,
        intermediate_size=3072,
        rotary_base=1000000.0,
        norm_eps=1e-6,
        qk_norm="per_head",
        tie_embeddings=True,
    ),
    "llama-3.2-1b": dict(
        _LLAMA,
        vocab_size=128256,
        block_size=131072,
        n_embd=2048,
        n_layer=16,
        n_head=32,
        n_query_groups=8,
        intermediate_size=8192,
        rotary_base=500000.0,
        rope_scaling=_LLAMA3_ROPE,
        norm_eps=1e-5,
        tie_embeddings=True,
    ),
    "olmo2-1b": dict(
        _LLAMA,
        vocab_size=100352,
        block_size=4096,
        n_embd=2048,
        n_layer=16,
        n_head=16,
        intermediate_size=8192,
        rotary_base=500000.0,
        norm_eps=1e-6,
        qk_norm="whole",
        norm_placement="post",
        tie_embeddings=False,
    ),
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


# Fields added with the Llama 3 / Qwen / OLMo 2 architectures (see ModelConfig.shape).
_LATER_FIELDS = (
    "n_query_groups",
    "head_dim",
    "qkv_bias",
    "qk_norm",
    "norm_placement",
    "rope_scaling",
)
_LLAMA3_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")


def _positive_int(value: Any) -> bool:
    # bool is an int subclass; reject it so `n_layer=True` is not silently 1.
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


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
    n_query_groups: int | None = None
    """Key/value heads (grouped-query attention); each serves n_head / n_query_groups query
    heads. None means n_head (multi-head attention); 1 is multi-query attention."""
    head_dim: int | None = None
    """Dims per attention head; None means n_embd // n_head. Set it when the attention width
    n_head * head_dim differs from n_embd (Qwen3: 16 x 128 over 1024)."""
    qkv_bias: bool | None = None
    """Bias on the q/k/v projection only; None follows ``bias``. ``bias=False, qkv_bias=True``
    is Qwen2's layout (biased q/k/v, no bias on the output projection or MLP)."""
    qk_norm: Literal["none", "per_head", "whole"] = "none"
    """RMSNorm on queries and keys before rotary: ``per_head`` normalises each head's head_dim
    (Qwen3), ``whole`` the whole q and k projections (OLMo 2)."""
    norm_placement: Literal["pre", "post"] = "pre"
    """``pre``: x + f(norm(x)) (Pythia, Llama). ``post``: x + norm(f(x)), the norm on the
    attention / MLP output before the residual add, no input norm (OLMo 2)."""
    rope_scaling: dict[str, Any] | None = None
    """Rotary frequency scaling; None is plain rotary. Llama 3's: ``{rope_type: llama3,
    factor, low_freq_factor, high_freq_factor, original_max_position_embeddings}``."""

    @property
    def padded_vocab_size(self) -> int:
        # Rounding the vocab up keeps the embedding / lm_head matmuls on friendly shapes.
        m = self.pad_vocab_multiple
        return -(-self.vocab_size // m) * m

    @property
    def head_size(self) -> int:
        return self.head_dim if self.head_dim is not None else self.n_embd // self.n_head

    @property
    def kv_heads(self) -> int:
        """Key/value heads: ``n_query_groups``, or n_head when it is None."""
        return self.n_query_groups if self.n_query_groups is not None else self.n_head

    @property
    def has_qkv_bias(self) -> bool:
        return self.bias if self.qkv_bias is None else self.qkv_bias

    def shape(self) -> dict[str, Any]:
        """The fields as a dict, leaving out later-added fields at their defaults, so a
        checkpoint recorded before they existed still compares equal on resume."""
        out = asdict(self)
        for f in fields(self):
            if f.name in _LATER_FIELDS and out[f.name] == f.default:
                del out[f.name]
        return out

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
        """Raise ValueError naming the first field that cannot build a model."""
        for field in (
            "vocab_size",
            "pad_vocab_multiple",
            "block_size",
            "n_layer",
            "n_head",
            "n_embd",
        ):
            if not _positive_int(getattr(self, field)):
                self._fail(field, "must be a positive int")
        for field in ("intermediate_size", "n_query_groups", "head_dim"):
            value = getattr(self, field)
            if value is not None and not _positive_int(value):
                self._fail(field, "must be None or a positive int")
        self._validate_attention()
        if not 0.0 <= self.rotary_pct <= 1.0:
            self._fail("rotary_pct", "must be in [0, 1]")
        if self.rotary_dims % 2 != 0:
            self._fail(
                "rotary_pct",
                f"gives odd rotary_dims={self.rotary_dims} "
                f"(head_size={self.head_size}); rotary needs an even number of dims",
            )
        if not self.rotary_base > 0:
            self._fail("rotary_base", "must be > 0")
        if not self.norm_eps > 0:
            self._fail("norm_eps", "must be > 0")
        for field, allowed in (
            ("norm", ("layernorm", "rmsnorm")),
            ("mlp", ("gelu", "swiglu")),
            ("qk_norm", ("none", "per_head", "whole")),
            ("norm_placement", ("pre", "post")),
        ):
            if getattr(self, field) not in allowed:
                self._fail(field, "must be " + " or ".join(repr(a) for a in allowed))
        if self.norm_placement == "post" and self.parallel_residual:
            self._fail("norm_placement", "'post' needs parallel_residual=False")
        self._validate_rope_scaling()

    def _fail(self, field: str, why: str) -> None:
        raise ValueError(f"ModelConfig.{field}={getattr(self, field)!r}: {why}")

    def _validate_attention(self) -> None:
        if self.head_dim is None and self.n_embd % self.n_head != 0:
            self._fail("n_embd", f"must be divisible by n_head={self.n_head} (or set head_dim)")
        if self.n_head % self.kv_heads != 0:
            self._fail("n_query_groups", f"must divide n_head={self.n_head}")
        if self.qkv_bias is not None and not isinstance(self.qkv_bias, bool):
            self._fail("qkv_bias", "must be None, true or false")

    def _validate_rope_scaling(self) -> None:
        rs = self.rope_scaling
        if rs is None:
            return
        if not isinstance(rs, dict) or rs.get("rope_type") != "llama3":
            self._fail("rope_scaling", "must be None or a dict with rope_type 'llama3'")
        for key in _LLAMA3_KEYS:
            value = rs.get(key)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
                self._fail("rope_scaling", f"{key} must be a positive number")
        if not rs["high_freq_factor"] > rs["low_freq_factor"]:
            self._fail("rope_scaling", "high_freq_factor must exceed low_freq_factor")
        unknown = sorted(set(rs) - {"rope_type", *_LLAMA3_KEYS})
        if unknown:
            self._fail("rope_scaling", f"unknown key {unknown[0]!r}")


def build_config(
    arch: str,
    model_config: Mapping[str, Any] | None,
    vocab_size: int | None,
    init_from: str | None,
    where: str = "model",
) -> ModelConfig:
    """The one builder of a ``CausalLM``'s shape from its arguments (its hyperparameters): a
    preset with overrides (``vocab_size`` linked from the data unless ``model_config`` fixes
    it), or an HF model's own config (``init_from: hf:...``; a checkpoint's hyperparameters
    hold it resolved, so it is not read again)."""
    from midtrain.data.hub import is_hf

    overrides = dict(model_config or {})
    if is_hf(init_from):
        assert init_from is not None
        if {f.name for f in fields(ModelConfig)} <= set(overrides):
            return ModelConfig(**overrides)
        from midtrain.model import hf

        return hf.config_for_init(init_from, overrides)
    if vocab_size is not None:
        overrides.setdefault("vocab_size", vocab_size)
    try:
        return ModelConfig.from_name(arch, **overrides)
    except ValueError as e:
        raise MidtrainError(f"{where}: {e}") from None


def config_from_hparams(hparams: Mapping[str, Any], where: str = "model") -> ModelConfig:
    """``build_config`` from a checkpoint's ``hyper_parameters``."""
    return build_config(
        hparams.get("arch", "pythia-70m"),
        hparams.get("model_config"),
        hparams.get("vocab_size"),
        hparams.get("init_from"),
        where,
    )
