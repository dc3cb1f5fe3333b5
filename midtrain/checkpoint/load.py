"""A trained model, ready to run, from a checkpoint of this trainer (file or distributed
directory) or an HF model: its ``ModelConfig`` from the checkpoint's hyperparameters, its
weights, and the tokenizer its run trained with."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from midtrain.data.hub import HF_PREFIX, is_hf, tokenizer_file
from midtrain.data.store import StoreIndex
from midtrain.errors import MidtrainError
from midtrain.model.config import ModelConfig, config_from_hparams
from midtrain.model.gpt import GPT
from midtrain.model.hf import load

AVERAGED_FROM = "averaged_from"  # a soup's record of its inputs (midtrain.checkpoint.average)

if TYPE_CHECKING:
    from tokenizers import Tokenizer


def checkpoint_config(hparams: dict[str, Any], where: str) -> ModelConfig:
    """The ModelConfig a CausalLM with these hyperparameters builds."""
    return config_from_hparams(hparams, where)


def weights_record(metadata: Mapping[str, Any]) -> dict[str, Any]:
    """What reading a checkpoint's weights needs (``model.shape``), from its hyperparameters:
    for a checkpoint without a run record (a soup, a weights-only save)."""
    hparams = metadata.get("hyper_parameters")
    if not isinstance(hparams, dict):
        return {}
    return {"model.shape": checkpoint_config(hparams, "--ckpt_path").shape()}


def load_checkpoint(
    path: str | Path, where: str = "--ckpt", weights: str = "live"
) -> tuple[ModelConfig, dict[str, torch.Tensor], dict[str, Any]]:
    """(ModelConfig, GPT weights, metadata) of a Lightning checkpoint file or sharded dir;
    ``weights="ema"``: its averaged weights (``midtrain.callbacks.EMA``) instead of the live."""
    from midtrain.checkpoint.files import load_weights, read_metadata

    path = Path(path)
    if not path.exists():
        raise MidtrainError(f"{where}: checkpoint not found: {path}")
    try:
        meta = read_metadata(path)
    except MidtrainError:
        raise
    except Exception:
        raise MidtrainError(
            f"{where}: {path} is not a checkpoint (cannot be read by torch.load)"
        ) from None
    if not isinstance(meta, dict) or "hyper_parameters" not in meta:
        raise MidtrainError(f"{where}: {path} is not a midtrain checkpoint (no hyper_parameters)")
    config = checkpoint_config(meta["hyper_parameters"], where)
    state = load_weights(path, weights)
    return config, {k: v for k, v in state.items() if not k.startswith("rope_")}, meta


def model_tokenizer(
    store: str | Path | None, init_from: str | None
) -> tuple[Path, str | None] | None:
    """The tokenizer a model trains with, and its EOS token: its store's, else that of the HF
    model it was initialised from; None when it has neither. The one lookup ``generate`` of a
    live ``CausalLM`` and the tools reading a checkpoint share."""
    if store and StoreIndex.exists(store) and (Path(store) / "tokenizer.json").is_file():
        return Path(store) / "tokenizer.json", StoreIndex.read(store, any_format=True).eos
    if is_hf(init_from):
        assert init_from is not None
        return tokenizer_file(init_from), None
    return None


def run_tokenizer(ckpt: Path, meta: dict[str, Any]) -> tuple[Path, str | None]:
    """The tokenizer a checkpoint's run trained with, and its EOS token: the store named in
    the run's config.yaml (next to ``checkpoints/``), else the HF model it was imported from."""
    import yaml

    from midtrain.checkpoint.layout import CHECKPOINTS, CONFIG

    run_dir = ckpt.parent.parent if ckpt.parent.name == CHECKPOINTS else ckpt.parent
    config_path = run_dir / CONFIG
    store = None
    if config_path.is_file():
        data = (yaml.safe_load(config_path.read_text()) or {}).get("data") or {}
        store = (data.get("init_args") or data).get("store")
    found = model_tokenizer(store, (meta.get("hyper_parameters") or {}).get("init_from"))
    if found is not None:
        return found
    sources = (meta.get(AVERAGED_FROM) or {}).get("sources") or []
    if sources and Path(sources[0]).exists():  # a soup (midtrain average): its inputs' run
        from midtrain.checkpoint.files import read_metadata

        return run_tokenizer(Path(sources[0]), read_metadata(sources[0]))
    raise MidtrainError(
        f"--tokenizer: cannot find the run's tokenizer for {ckpt} (no "
        f"{config_path} naming a store); give --tokenizer <tokenizer.json, "
        "store dir or hf:model>"
    )


def tokenizer_source(given: str) -> tuple[Path, str | None]:
    """--tokenizer: a tokenizer.json, a store directory or an HF model -> (file, eos token)."""
    p = Path(given)
    if p.is_file():
        return p, None
    if StoreIndex.exists(p):
        return p / "tokenizer.json", StoreIndex.read(p, any_format=True).eos
    if given.startswith(HF_PREFIX) or (p / "tokenizer.json").is_file():
        return tokenizer_file(given if given.startswith(HF_PREFIX) else HF_PREFIX + given), None
    raise MidtrainError(f"--tokenizer: {given} is not a tokenizer.json, a store or an HF model")


def _eos_token(tok: Tokenizer, eos: str | None, where: str) -> str:
    from midtrain.data.tokenizer import DEFAULT_EOS

    for candidate in (eos, DEFAULT_EOS, "</s>", "<eos>"):
        if candidate and tok.token_to_id(candidate) is not None:
            return candidate
    raise MidtrainError(f"{where}: the tokenizer has no end-of-text token; give one with --eos")


def check_tokenizer(tok: Tokenizer, config: ModelConfig, where: str) -> None:
    size = tok.get_vocab_size(with_added_tokens=True)
    if size > config.padded_vocab_size:
        raise MidtrainError(
            f"{where}: the tokenizer has {size} tokens but the model's vocabulary "
            f"is {config.padded_vocab_size}; use the tokenizer it was trained with"
        )


def load_model(
    source: str,
    tokenizer: str | None = None,
    device: str = "cpu",
    dtype: str | None = None,
    where: str = "--ckpt",
) -> tuple[GPT, Tokenizer, int | None]:
    """(GPT in eval mode, tokenizers.Tokenizer, EOS id) of a checkpoint (file or distributed
    dir) or ``hf:<dir or hub id>[@revision]``; the tokenizer is the run's (or HF model's)
    unless ``tokenizer`` (a tokenizer.json, store dir or hf:model) is given."""
    from tokenizers import Tokenizer

    if source.startswith(HF_PREFIX):
        config, state = load(source, where)
        tok_path, eos = tokenizer_source(tokenizer) if tokenizer else (tokenizer_file(source), None)
    else:
        config, state, meta = load_checkpoint(source, where)
        tok_path, eos = (
            tokenizer_source(tokenizer) if tokenizer else run_tokenizer(Path(source), meta)
        )
    tok = Tokenizer.from_file(str(tok_path))
    check_tokenizer(tok, config, "--tokenizer")
    eos_token = _eos_token(tok, eos, "--tokenizer")
    with torch.device("meta"):
        model = GPT(config)
    model.to_empty(device=device)
    model.reset_buffers()
    model.load_state_dict(state)
    if dtype is not None:
        model.to({"bf16": torch.bfloat16, "fp16": torch.float16, "float32": torch.float32}[dtype])
    return model.eval(), tok, tok.token_to_id(eos_token)
