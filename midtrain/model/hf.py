"""Hugging Face interop: export a checkpoint as a ``transformers`` model directory, and import a
``transformers`` model (a local directory or a hub id, optionally ``@revision``) into ``GPT``.

Five architectures (HF ``model_type``) map one to one onto ``GPT``:

- ``gpt_neox`` (Pythia): LayerNorm with bias, exact-erf GELU MLP, fused per-head ``[q|k|v]``
  projection (the very layout of ``CausalSelfAttention.qkv``), partial rotary, parallel or
  sequential residual.
- ``llama`` (Llama 2/3, SmolLM2): RMSNorm, SwiGLU, full rotary (plain or Llama 3 scaled),
  sequential residual, grouped-query attention, tied or untied head; separate q/k/v projections
  are cut from / stacked into the fused one, group by group.
- ``qwen2``: ``llama`` with biased q/k/v and no other bias (``bias=False, qkv_bias=True``).
- ``qwen3``: ``llama`` with per-head RMSNorm on q and k (``qk_norm="per_head"``).
- ``olmo2``: ``llama`` with RMSNorm over the whole q and k projections (``qk_norm="whole"``)
  and the block norms after attention / MLP (``norm_placement="post"``).

Any other option is refused with one line naming it: nothing is exported or imported approximately.
Needs the ``hf`` extra (``pip install midtrain[hf]``: transformers, safetensors)."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

import torch

from midtrain.data.hub import TOKENIZER_FILE, resolve
from midtrain.errors import MidtrainError
from midtrain.model.config import ModelConfig
from midtrain.model.gpt import GPT

if TYPE_CHECKING:
    from midtrain.data.store import Store


def _require(module: str) -> ModuleType:
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise MidtrainError(
            f"{module} is not installed; Hugging Face interop needs `pip install midtrain[hf]`"
        ) from None


def _refuse_neox(config: ModelConfig) -> None:
    """What GPTNeoX (a GELU MLP) cannot express, as a one-line error."""
    if config.norm != "layernorm":
        raise MidtrainError(
            f"export: norm={config.norm!r} with a GELU MLP has no transformers "
            "equivalent (GPTNeoX uses LayerNorm)"
        )
    if not config.bias:
        raise MidtrainError(
            "export: bias=False with a GELU MLP has no transformers "
            "equivalent (GPTNeoX's MLP and LayerNorm always have biases)"
        )
    plain = dict(
        n_query_groups=(config.kv_heads, config.n_head),
        head_dim=(config.head_size, config.n_embd // config.n_head),
        qkv_bias=(config.has_qkv_bias, config.bias),
        qk_norm=(config.qk_norm, "none"),
        norm_placement=(config.norm_placement, "pre"),
        rope_scaling=(config.rope_scaling, None),
    )
    for key, (value, needed) in plain.items():
        if value != needed:
            raise MidtrainError(
                f"export: {key}={getattr(config, key)!r} with a GELU MLP has no transformers "
                f"equivalent (GPTNeoX needs {needed!r})"
            )


def _refuse_llama_family(config: ModelConfig) -> None:
    """What no SwiGLU architecture of transformers' (Llama, Qwen2/3, OLMo 2) can express."""
    if config.norm != "rmsnorm":
        raise MidtrainError(
            f"export: norm={config.norm!r} with a SwiGLU MLP has no transformers "
            "equivalent (Llama uses RMSNorm)"
        )
    if config.parallel_residual:
        raise MidtrainError(
            "export: parallel_residual=True with a SwiGLU MLP has no transformers "
            "equivalent (Llama is sequential)"
        )
    if config.rotary_dims != config.head_size:
        raise MidtrainError(
            f"export: rotary_pct={config.rotary_pct} with a SwiGLU MLP has no "
            "transformers equivalent (Llama rotates every head dim)"
        )


def hf_architecture(config: ModelConfig) -> str:
    """The transformers ``model_type`` that computes exactly what ``config`` does: gpt_neox,
    llama, qwen2, qwen3 or olmo2; or a one-line error naming the option none can express."""
    if config.mlp == "gelu":
        _refuse_neox(config)
        return "gpt_neox"
    _refuse_llama_family(config)
    if config.norm_placement == "post" or config.qk_norm == "whole":
        arch, needs = "olmo2", dict[str, Any](norm_placement="post", qk_norm="whole")
    elif config.qk_norm == "per_head":
        arch, needs = "qwen3", {}
    elif config.has_qkv_bias and not config.bias:
        arch, needs = "qwen2", {}
    else:
        arch, needs = "llama", dict(qkv_bias=config.bias)
    if arch != "llama":  # their MLPs and output projections have no bias
        needs.update(bias=False, qkv_bias=arch == "qwen2")
    for key, value in needs.items():
        have = config.has_qkv_bias if key == "qkv_bias" else getattr(config, key)
        if have != value:
            raise MidtrainError(
                f"export: {key}={have!r} has no transformers equivalent in {arch} "
                f"(which the other options select; it needs {key}={value!r})"
            )
    return arch


_HF_CLASSES = {
    "gpt_neox": ("GPTNeoXConfig", "GPTNeoXForCausalLM"),
    "llama": ("LlamaConfig", "LlamaForCausalLM"),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM"),
    "olmo2": ("Olmo2Config", "Olmo2ForCausalLM"),
}


def _rope_parameters(config: ModelConfig) -> dict[str, Any]:
    if config.rope_scaling is None:
        return {"rope_type": "default", "rope_theta": config.rotary_base}
    return {**config.rope_scaling, "rope_theta": config.rotary_base}


def to_hf_config(config: ModelConfig, bos_id: int | None = None, eos_id: int | None = None) -> Any:
    """The ``transformers`` config of ``config``; the vocabulary is the padded one (as Pythia's)."""
    transformers = _require("transformers")
    arch = hf_architecture(config)
    config_class, model_class = _HF_CLASSES[arch]
    common: dict[str, Any] = dict(
        vocab_size=config.padded_vocab_size,
        hidden_size=config.n_embd,
        num_hidden_layers=config.n_layer,
        num_attention_heads=config.n_head,
        intermediate_size=config.mlp_hidden_size,
        max_position_embeddings=config.block_size,
        tie_word_embeddings=config.tie_embeddings,
        bos_token_id=bos_id,
        eos_token_id=eos_id,
        architectures=[model_class],
        dtype="float32",
    )
    if arch == "gpt_neox":
        extra: dict[str, Any] = dict(
            hidden_act="gelu",
            layer_norm_eps=config.norm_eps,
            use_parallel_residual=config.parallel_residual,
            attention_bias=True,
            rope_parameters={
                "rope_type": "default",
                "rope_theta": config.rotary_base,
                "partial_rotary_factor": config.rotary_pct,
            },
        )
    else:
        extra = dict(
            hidden_act="silu",
            rms_norm_eps=config.norm_eps,
            num_key_value_heads=config.kv_heads,
            head_dim=config.head_size,
            rope_parameters=_rope_parameters(config),
            pad_token_id=None,
        )
        if arch == "llama":
            extra.update(attention_bias=config.bias, mlp_bias=config.bias)
        elif arch != "qwen2":  # Qwen2's q/k/v biases are fixed, not a config key
            extra.update(attention_bias=False)
    return getattr(transformers, config_class)(**common, **extra)


def _rope(hf: dict[str, Any]) -> dict[str, Any]:
    """rope settings from a config.json of any transformers version (4.x keys or 5.x)."""
    rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    rope.setdefault("rope_theta", hf.get("rope_theta", hf.get("rotary_emb_base", 10000.0)))
    if "rotary_pct" in hf:
        rope.setdefault("partial_rotary_factor", hf["rotary_pct"])
    return rope


_LLAMA3_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")


def _rope_fields(hf: dict[str, Any], where: str) -> dict[str, Any]:
    """rotary_base and rope_scaling; any rope type other than default/llama3 is refused."""
    rope = _rope(hf)
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ("default", "llama3"):
        raise MidtrainError(
            f"{where}: rope_parameters.rope_type {rope_type!r} is not supported "
            "(only 'default' and 'llama3')"
        )
    out: dict[str, Any] = dict(rotary_base=float(rope["rope_theta"]))
    if rope_type == "llama3":
        missing = [k for k in _LLAMA3_KEYS if k not in rope]
        if missing:
            raise MidtrainError(f"{where}: llama3 rope_parameters miss {missing[0]!r}")
        scaling: dict[str, Any] = {k: float(rope[k]) for k in _LLAMA3_KEYS}
        scaling["original_max_position_embeddings"] = int(rope["original_max_position_embeddings"])
        out["rope_scaling"] = {"rope_type": "llama3", **scaling}
    return out


_MODEL_TYPES = ("gpt_neox", "llama", "qwen2", "qwen3", "olmo2")


def from_hf_config(hf: dict[str, Any], where: str) -> dict[str, Any]:
    """``ModelConfig`` fields for an HF ``config.json`` dict, or a one-line error."""
    model_type = hf.get("model_type")
    if model_type not in _MODEL_TYPES:
        raise MidtrainError(
            f"{where}: model_type {model_type!r} is not supported; "
            f"midtrain imports {', '.join(_MODEL_TYPES)} models"
        )
    if float(hf.get("attention_dropout", 0.0) or 0.0) != 0.0:
        raise MidtrainError(
            f"{where}: attention_dropout={hf['attention_dropout']} is not supported (no dropout)"
        )
    n_embd, n_head = int(hf["hidden_size"]), int(hf["num_attention_heads"])
    vocab = int(hf["vocab_size"])
    out: dict[str, Any] = dict(
        name=f"{model_type}-import",
        vocab_size=vocab,
        pad_vocab_multiple=128 if vocab % 128 == 0 else 1,  # the embedding keeps HF's rows
        block_size=int(hf.get("max_position_embeddings", 2048)),
        n_layer=int(hf["num_hidden_layers"]),
        n_head=n_head,
        n_embd=n_embd,
        intermediate_size=int(hf.get("intermediate_size") or 4 * n_embd),
        tie_embeddings=bool(hf.get("tie_word_embeddings", model_type == "llama")),
        **_rope_fields(hf, where),
    )
    head_dim = hf.get("head_dim") or n_embd // n_head
    if model_type == "gpt_neox":
        if head_dim * n_head != n_embd:
            raise MidtrainError(
                f"{where}: head_dim {head_dim} x {n_head} heads != hidden_size {n_embd}"
            )
        out.update(_neox_fields(hf, where))
    else:
        kv = int(hf.get("num_key_value_heads") or n_head)
        out.update(n_query_groups=None if kv == n_head else kv)
        out.update(head_dim=None if head_dim * n_head == n_embd else int(head_dim))
        out.update(_llama_family_fields(hf, model_type, where))
    if "rope_scaling" in out and model_type == "gpt_neox":
        raise MidtrainError(f"{where}: rope_type 'llama3' is not supported for gpt_neox")
    return out


def _neox_fields(hf: dict[str, Any], where: str) -> dict[str, Any]:
    if hf.get("hidden_act", "gelu") != "gelu":
        raise MidtrainError(
            f"{where}: hidden_act {hf['hidden_act']!r} is not supported "
            "(GPTNeoX import needs exact 'gelu')"
        )
    if not hf.get("attention_bias", True):
        raise MidtrainError(f"{where}: attention_bias=false is not supported for gpt_neox")
    return dict(
        norm="layernorm",
        mlp="gelu",
        bias=True,
        norm_eps=float(hf.get("layer_norm_eps", 1e-5)),
        parallel_residual=bool(hf.get("use_parallel_residual", True)),
        rotary_pct=float(_rope(hf).get("partial_rotary_factor", 1.0)),
    )


def _refuse_hf_keys(hf: dict[str, Any], model_type: str, where: str) -> None:
    """Options of the Llama-family configs that ``GPT`` cannot compute, one line each."""
    if hf.get("hidden_act", "silu") != "silu":
        raise MidtrainError(
            f"{where}: hidden_act {hf['hidden_act']!r} is not supported ({model_type} needs 'silu')"
        )
    if hf.get("use_sliding_window"):
        raise MidtrainError(
            f"{where}: use_sliding_window=true (sliding-window attention) is not supported"
        )
    layer_types = set(hf.get("layer_types") or ["full_attention"])
    if layer_types != {"full_attention"}:
        other = sorted(layer_types - {"full_attention"})[0]
        raise MidtrainError(
            f"{where}: layer_types {other!r} is not supported (only full_attention)"
        )
    if float(_rope(hf).get("partial_rotary_factor", 1.0)) != 1.0:
        raise MidtrainError(
            f"{where}: partial_rotary_factor != 1 is not supported for {model_type}"
        )
    if int(hf.get("pretraining_tp", 1)) != 1:
        raise MidtrainError(f"{where}: pretraining_tp != 1 is not supported")
    if model_type == "llama":
        if bool(hf.get("attention_bias", False)) != bool(hf.get("mlp_bias", False)):
            raise MidtrainError(f"{where}: attention_bias != mlp_bias is not supported")
    elif model_type != "qwen2" and hf.get("attention_bias", False):
        # would put a bias on the output projection but not on the MLP
        raise MidtrainError(f"{where}: attention_bias=true is not supported for {model_type}")


def _llama_family_fields(hf: dict[str, Any], model_type: str, where: str) -> dict[str, Any]:
    _refuse_hf_keys(hf, model_type, where)
    bias = model_type == "llama" and bool(hf.get("attention_bias", False))
    return dict(
        norm="rmsnorm",
        mlp="swiglu",
        bias=bias,
        qkv_bias=True if model_type == "qwen2" else None,
        qk_norm={"qwen3": "per_head", "olmo2": "whole"}.get(model_type, "none"),
        norm_placement="post" if model_type == "olmo2" else "pre",
        norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        parallel_residual=False,
        rotary_pct=1.0,
    )


def _qkv_split(
    w: torch.Tensor, config: ModelConfig
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Our fused [q_g1..q_gm|k_g|v_g]-per-group rows -> separate q, k, v projections."""
    groups, per_kv = config.kv_heads, config.n_head // config.kv_heads
    shaped = w.reshape(groups, per_kv + 2, config.head_size, *w.shape[1:])
    q = shaped[:, :per_kv].reshape(-1, *w.shape[1:])
    k, v = (shaped[:, i].reshape(-1, *w.shape[1:]) for i in (per_kv, per_kv + 1))
    return q, k, v


def _qkv_fuse(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, config: ModelConfig
) -> torch.Tensor:
    groups, hs = config.kv_heads, config.head_size
    parts = [t.reshape(groups, -1, hs, *t.shape[1:]) for t in (q, k, v)]
    return torch.cat(parts, dim=1).reshape(-1, *q.shape[1:])


# Where our parameters live in each HF architecture (the Llama family's q/k/v are split from
# attn.qkv separately): the root module, embedding, per-layer norms and linears, final norm
# and head.
_NEOX_NORMS = {"norm_1": "input_layernorm", "norm_2": "post_attention_layernorm"}
_LLAMA_LINEARS = {
    "attn.proj": "self_attn.o_proj",
    "mlp.fc_1": "mlp.gate_proj",
    "mlp.fc_2": "mlp.up_proj",
    "mlp.proj": "mlp.down_proj",
}
_LLAMA = dict(
    root="model",
    embed="model.embed_tokens.weight",
    final="model.norm",
    head="lm_head.weight",
    norms=_NEOX_NORMS,
    linears=_LLAMA_LINEARS,
)


_LAYOUTS: dict[str, dict[str, Any]] = {
    "gpt_neox": dict(
        root="gpt_neox",
        embed="gpt_neox.embed_in.weight",
        final="gpt_neox.final_layer_norm",
        head="embed_out.weight",
        norms=_NEOX_NORMS,
        linears={
            "attn.qkv": "attention.query_key_value",
            "attn.proj": "attention.dense",
            "mlp.fc": "mlp.dense_h_to_4h",
            "mlp.proj": "mlp.dense_4h_to_h",
        },
    ),
    "llama": _LLAMA,
    "qwen2": _LLAMA,
    "qwen3": _LLAMA,
    # OLMo 2's block norms sit after attention / MLP (norm_placement="post")
    "olmo2": dict(
        _LLAMA, norms={"norm_1": "post_attention_layernorm", "norm_2": "post_feedforward_layernorm"}
    ),
}


def _per_layer(config: ModelConfig, arch: str) -> dict[str, tuple[str, tuple[str, ...]]]:
    """Our per-block module -> (HF module, parameter suffixes), the split qkv excepted."""
    layout = _LAYOUTS[arch]
    suffixes = ("weight", "bias") if config.bias or arch == "gpt_neox" else ("weight",)
    norm_suffixes = ("weight", "bias") if config.norm == "layernorm" else ("weight",)
    per_layer: dict[str, tuple[str, tuple[str, ...]]] = {
        **{ours: (theirs, norm_suffixes) for ours, theirs in layout["norms"].items()},
        **{ours: (theirs, suffixes) for ours, theirs in layout["linears"].items()},
    }
    if config.qk_norm != "none":
        per_layer.update(
            {f"attn.{n}": (f"self_attn.{n}", ("weight",)) for n in ("q_norm", "k_norm")}
        )
    return per_layer


def _name_map(config: ModelConfig, arch: str) -> dict[str, str]:
    """Our parameter name -> the HF one (everything except the Llama family's split qkv)."""
    layout = _LAYOUTS[arch]
    root, final = layout["root"], layout["final"]
    names = {"embed.weight": layout["embed"]}
    for i in range(config.n_layer):
        for ours, (theirs, sfx) in _per_layer(config, arch).items():
            for s in sfx:
                names[f"blocks.{i}.{ours}.{s}"] = f"{root}.layers.{i}.{theirs}.{s}"
    for s in ("weight", "bias") if config.norm == "layernorm" else ("weight",):
        names[f"norm_f.{s}"] = f"{final}.{s}"
    if not config.tie_embeddings:
        names["lm_head.weight"] = layout["head"]
    return names


def _qkv_suffixes(config: ModelConfig) -> tuple[str, ...]:
    return ("weight", "bias") if config.has_qkv_bias else ("weight",)


def to_hf_state_dict(
    state: dict[str, torch.Tensor], config: ModelConfig
) -> dict[str, torch.Tensor]:
    arch = hf_architecture(config)
    out = {theirs: state[ours] for ours, theirs in _name_map(config, arch).items()}
    if arch != "gpt_neox":
        for i in range(config.n_layer):
            for s in _qkv_suffixes(config):
                q, k, v = _qkv_split(state[f"blocks.{i}.attn.qkv.{s}"], config)
                for name, t in zip(("q", "k", "v"), (q, k, v), strict=True):
                    out[f"model.layers.{i}.self_attn.{name}_proj.{s}"] = t
    return {k: v.contiguous() for k, v in out.items()}


def from_hf_state_dict(
    hf_state: dict[str, torch.Tensor], config: ModelConfig, where: str
) -> dict[str, torch.Tensor]:
    arch = hf_architecture(config)
    names = _name_map(config, arch)
    if arch == "gpt_neox" and "embed_out.weight" not in hf_state and "lm_head.weight" in hf_state:
        # transformers 5 names Pythia's output layer lm_head (and reads embed_out as that)
        hf_state = {**hf_state, "embed_out.weight": hf_state["lm_head.weight"]}
    qkv = [
        f"model.layers.{i}.self_attn.{n}_proj.{s}"
        for i in range(config.n_layer)
        for s in _qkv_suffixes(config)
        for n in "qkv"
    ]
    wanted = [*names.values(), *(qkv if arch != "gpt_neox" else [])]
    missing = [theirs for theirs in wanted if theirs not in hf_state]
    if missing:
        raise MidtrainError(f"{where}: weights miss {missing[0]} ({len(missing)} missing tensors)")
    out = {ours: hf_state[theirs] for ours, theirs in names.items()}
    if config.tie_embeddings:
        out["lm_head.weight"] = out["embed.weight"]
    if arch != "gpt_neox":
        for i in range(config.n_layer):
            for s in _qkv_suffixes(config):
                q, k, v = (hf_state[f"model.layers.{i}.self_attn.{n}_proj.{s}"] for n in "qkv")
                out[f"blocks.{i}.attn.qkv.{s}"] = _qkv_fuse(q, k, v, config)
    return out


def read_config(directory: Path, where: str) -> dict[str, Any]:
    path = directory / "config.json"
    if not path.is_file():
        raise MidtrainError(f"{where}: {directory} has no config.json; not a transformers model")
    return json.loads(path.read_text())


def read_state(directory: Path, where: str) -> dict[str, torch.Tensor]:
    """Every tensor of the model directory (safetensors preferred, sharded or not)."""
    for index_name, single in (
        ("model.safetensors.index.json", "model.safetensors"),
        ("pytorch_model.bin.index.json", "pytorch_model.bin"),
    ):
        index = directory / index_name
        files = (
            sorted(set(json.loads(index.read_text())["weight_map"].values()))
            if index.is_file()
            else [single]
            if (directory / single).is_file()
            else []
        )
        if not files:
            continue
        state: dict[str, torch.Tensor] = {}
        for f in files:
            if f.endswith(".safetensors"):
                st = _require("safetensors.torch")
                state.update(st.load_file(str(directory / f)))
            else:
                state.update(torch.load(directory / f, map_location="cpu", weights_only=True))
        return state
    raise MidtrainError(f"{where}: {directory} has no model.safetensors or pytorch_model.bin")


def load(spec: str, where: str = "init_from") -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """ModelConfig and GPT state dict of an HF model ``hf:<dir or id>[@rev]``."""
    directory = resolve(spec, where)
    config = config_of(spec, where, directory)
    return config, from_hf_state_dict(read_state(directory, where), config, where)


def config_of(spec: str, where: str = "init_from", directory: Path | None = None) -> ModelConfig:
    directory = directory or resolve(spec, where, patterns=("config.json",))
    try:
        return ModelConfig(**from_hf_config(read_config(directory, where), where))
    except (KeyError, TypeError, ValueError) as e:
        raise MidtrainError(f"{where}: {directory}/config.json: {e}") from None


# keys an HF-initialised model may set differently from its HF config (no weight depends on them)
_FREE_KEYS = {"block_size"}


def config_for_init(init_from: str, model_config: dict[str, Any] | None) -> ModelConfig:
    """The shape ``CausalLM(init_from="hf:...")`` builds: the HF config's, plus any
    ``model_config`` entry that agrees with it (or changes only the context length)."""
    config = config_of(init_from, "model.init_from")
    given = dict(model_config or {})
    derived = asdict(config)
    unknown = sorted(set(given) - set(derived))
    if unknown:
        raise MidtrainError(f"model.model_config: unknown field {unknown[0]!r}")
    for key, value in given.items():
        if key in _FREE_KEYS or key == "name":
            continue
        if value != derived[key]:
            raise MidtrainError(
                f"model.model_config.{key}={value!r} conflicts with {init_from} "
                f"({key}={derived[key]!r}); drop it: the shape comes from the HF config"
            )
    config = ModelConfig(**{**derived, **{k: given[k] for k in _FREE_KEYS if k in given}})
    try:
        config.validate()
    except ValueError as e:
        raise MidtrainError(f"model: {e}") from None
    return config


def check_store(init_from: str, store: Store) -> None:
    """Refuse a token store that does not line up with the HF model: another vocabulary than
    the model's tokenizer, or another end-of-text id than its config's."""
    from tokenizers import Tokenizer

    directory = resolve(init_from, "model.init_from")
    hf_tokenizer = directory / TOKENIZER_FILE
    fix = f"prepare the store with `tokenizer: {{hub: {init_from}}}`"
    if hf_tokenizer.is_file():
        ours = Tokenizer.from_file(str(store.tokenizer_path)).get_vocab(with_added_tokens=True)
        theirs = Tokenizer.from_file(str(hf_tokenizer)).get_vocab(with_added_tokens=True)
        if ours != theirs:
            raise MidtrainError(
                f"data.store: {store.root} was tokenized with another tokenizer "
                f"than {init_from} ({len(ours)} vs {len(theirs)} tokens); {fix}"
            )
    eos = read_config(directory, "model.init_from").get("eos_token_id")
    eos_ids = eos if isinstance(eos, list) else [eos] if eos is not None else []
    if eos_ids and store.eos_id not in eos_ids:
        raise MidtrainError(
            f"data.store: end-of-text id {store.eos_id} of {store.root} is not "
            f"the model's eos_token_id {eos}; {fix}"
        )


def load_into(model: GPT, init_from: str, sharded: bool) -> None:
    """Load the HF weights into ``model``. Sharded (FSDP2): rank 0 reads the files and each
    tensor is broadcast and sliced into the local shards, so no other rank holds a full copy."""
    where = "model.init_from"
    if not sharded:
        _, state = load(init_from, where)
        model.load_state_dict(state)
        return
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    state = load(init_from, where)[1] if dist.get_rank() == 0 else {}
    set_model_state_dict(
        model,
        state,  # type: ignore[arg-type]  # torch types it dict[str, ValueType]: invariant
        options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True),
    )
