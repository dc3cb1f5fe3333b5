"""A trained model, ready to run, from a checkpoint of this trainer (file or distributed
directory) or an HF model: its ``ModelConfig`` from the checkpoint's hyperparameters, its
weights, and the tokenizer its run trained with."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from midtrain.data.hub import HF_PREFIX, TOKENIZER_FILE, is_hf, tokenizer_file
from midtrain.data.store import StoreIndex
from midtrain.data.tokenizer import Bos, model_tokens
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


def check_init_from(init_from: str, config: ModelConfig) -> None:
    """``model.init_from``'s weights fit a model of ``config``: the parameter names and shapes of
    the model its hyperparameters describe, compared before anything is written (the weights
    are read when the model is built). One line naming the fields that differ."""
    from midtrain.checkpoint.files import read_metadata

    hparams = read_metadata(init_from).get("hyper_parameters")
    if not isinstance(hparams, dict):
        return  # a plain state dict: loading it says what does not fit
    theirs = checkpoint_config(hparams, "model.init_from")
    if _parameter_shapes(theirs) == _parameter_shapes(config):
        return
    saved, ours = asdict(theirs), asdict(config)
    fields = ", ".join(f"{k} {saved[k]!r} -> {v!r}" for k, v in ours.items() if saved[k] != v)
    raise MidtrainError(
        f"model.init_from: {init_from} holds the weights of another model ({fields}); set "
        "model.arch and model.model_config to the model it was trained as"
    )


def _parameter_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):
        return {k: tuple(v.shape) for k, v in GPT(config).state_dict().items()}


@dataclass(frozen=True)
class TokenizerSource:
    """A tokenizer file and the conventions of the texts a model saw: the EOS token that ends
    a document (None: not recorded, see ``_eos_token``), the BOS token id and whether a BOS
    starts every document (``add_bos`` None: not recorded, see ``Bos.of``)."""

    path: Path
    eos: str | None = None
    bos_id: int | None = None
    add_bos: bool | None = None

    @classmethod
    def of_store(cls, store: str | Path) -> TokenizerSource:
        index = StoreIndex.read(store, any_format=True)
        return cls(Path(store) / TOKENIZER_FILE, index.eos, index.bos_id, index.add_bos)

    @classmethod
    def of_model(cls, spec: str) -> TokenizerSource:
        """An HF model's tokenizer (``hf:<dir or hub id>[@revision]``), with the EOS and BOS
        its directory names (as ``midtrain prepare`` reads them)."""
        from tokenizers import Tokenizer

        path = tokenizer_file(spec)
        tok = Tokenizer.from_file(str(path))
        tokens = model_tokens(path.parent, tok)
        bos_id = tok.token_to_id(tokens.bos) if tokens.bos else None
        return cls(path, tokens.eos, bos_id, tokens.add_bos and bos_id is not None)

    def bos(self, tok: Tokenizer) -> Bos:
        return Bos.of(tok, self.bos_id, self.add_bos)


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


def model_tokenizer(store: str | Path | None, init_from: str | None) -> TokenizerSource | None:
    """The tokenizer a model trains with, and its conventions: its store's, else that of the
    HF model it was initialised from; None when it has neither. The one lookup ``generate`` of
    a live ``CausalLM`` and the tools reading a checkpoint share."""
    if store and StoreIndex.exists(store) and (Path(store) / TOKENIZER_FILE).is_file():
        return TokenizerSource.of_store(store)
    if is_hf(init_from):
        assert init_from is not None
        return TokenizerSource.of_model(init_from)
    return None


def run_tokenizer(ckpt: Path, meta: dict[str, Any]) -> TokenizerSource:
    """The tokenizer a checkpoint's run trained with, and its EOS and BOS: the store named in
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


def tokenizer_source(given: str) -> TokenizerSource:
    """--tokenizer: a tokenizer.json, a store directory or an HF model."""
    p = Path(given)
    if p.is_file():
        return TokenizerSource(p)
    if StoreIndex.exists(p):
        return TokenizerSource.of_store(p)
    if is_hf(given) or (p / TOKENIZER_FILE).is_file():
        return TokenizerSource.of_model(given if is_hf(given) else HF_PREFIX + given)
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


@dataclass(frozen=True)
class LoadedModel:
    """A model ready to run: the GPT in eval mode, its tokenizer, the EOS id and the BOS
    convention its texts follow."""

    model: GPT
    tokenizer: Tokenizer
    eos_id: int | None
    bos: Bos


def open_model(
    source: str,
    tokenizer: str | None = None,
    device: str = "cpu",
    dtype: str | None = None,
    where: str = "--ckpt",
    weights: str = "live",
) -> LoadedModel:
    """The model of a checkpoint (file or distributed dir) or ``hf:<dir or hub id>[@revision]``;
    the tokenizer is the run's (or HF model's) unless ``tokenizer`` (a tokenizer.json, store
    dir or hf:model) is given. ``weights="ema"``: a checkpoint's averaged weights."""
    from tokenizers import Tokenizer

    from midtrain.checkpoint.files import check_weights_choice

    check_weights_choice(weights)
    if is_hf(source):
        if weights != "live":
            raise MidtrainError(
                f"--weights {weights}: {source} is a Hugging Face model, which holds one set "
                "of weights; use --weights live (averaged weights are in midtrain checkpoints)"
            )
        config, state = load(source, where)
        src = tokenizer_source(tokenizer) if tokenizer else TokenizerSource.of_model(source)
    else:
        config, state, meta = load_checkpoint(source, where, weights)
        src = tokenizer_source(tokenizer) if tokenizer else run_tokenizer(Path(source), meta)
    tok = Tokenizer.from_file(str(src.path))
    check_tokenizer(tok, config, "--tokenizer")
    eos_token = _eos_token(tok, src.eos, "--tokenizer")
    with torch.device("meta"):
        model = GPT(config)
    model.to_empty(device=device)
    model.reset_buffers()
    model.load_state_dict(state)
    if dtype is not None:
        model.to({"bf16": torch.bfloat16, "fp16": torch.float16, "float32": torch.float32}[dtype])
    return LoadedModel(model.eval(), tok, tok.token_to_id(eos_token), src.bos(tok))


def load_model(
    source: str, tokenizer: str | None = None, **options: Any
) -> tuple[GPT, Tokenizer, int | None]:
    """(GPT in eval mode, tokenizers.Tokenizer, EOS id): :func:`open_model` (with its
    ``device``, ``dtype``, ``where`` and ``weights`` options) as a tuple."""
    loaded = open_model(source, tokenizer, **options)
    return loaded.model, loaded.tokenizer, loaded.eos_id
