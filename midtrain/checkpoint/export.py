"""``midtrain export``: a checkpoint as a Hugging Face ``transformers`` model directory
(config, safetensors, generation config, tokenizer), written whole or not at all."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from midtrain.checkpoint.load import (
    TokenizerSource,
    _eos_token,
    check_tokenizer,
    load_checkpoint,
    run_tokenizer,
    tokenizer_source,
)
from midtrain.data.tokenizer import Bos
from midtrain.errors import MidtrainError
from midtrain.model.hf import _require, hf_architecture, to_hf_config, to_hf_state_dict

if TYPE_CHECKING:
    from tokenizers import Tokenizer

MAX_SHARD_SIZE = "5GB"  # safetensors shards above this size, as transformers' save_pretrained
DTYPES = {  # --dtype: the names it takes
    "float32": torch.float32,
    "fp32": torch.float32,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
}


def export(
    ckpt: str | Path,
    out: str | Path,
    dtype: str = "float32",
    tokenizer: str | None = None,
    eos: str | None = None,
    max_shard_size: str | int = MAX_SHARD_SIZE,
    weights: str = "live",
) -> Path:
    """Write ``out`` as a transformers model directory (config, safetensors, generation config,
    tokenizer). Built in a temporary directory next to ``out`` and renamed: never half-written.
    ``weights="ema"`` exports the checkpoint's averaged weights (``midtrain.callbacks.EMA``)."""
    from tokenizers import Tokenizer

    transformers = _require("transformers")
    hub = _require("huggingface_hub")
    out = Path(out)
    if out.exists():
        raise MidtrainError(f"--out: {out} exists; choose a new directory")
    if dtype not in DTYPES:
        raise MidtrainError(f"--dtype: {dtype!r} is not one of float32, bf16, fp16")
    config, state, meta = load_checkpoint(ckpt, weights=weights)
    hf_architecture(config)  # refuse before any work
    source = tokenizer_source(tokenizer) if tokenizer else run_tokenizer(Path(ckpt), meta)
    tok = Tokenizer.from_file(str(source.path))
    check_tokenizer(tok, config, "--tokenizer")
    fast = _hf_tokenizer(tok, source, eos, config.block_size)
    bos_id, eos_id = fast.bos_token_id, fast.eos_token_id
    hf_state = {k: v.to(DTYPES[dtype]) for k, v in to_hf_state_dict(state, config).items()}

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        hf_config = to_hf_config(config, bos_id=bos_id, eos_id=eos_id)
        hf_config.dtype = str(DTYPES[dtype]).removeprefix("torch.")
        hf_config.save_pretrained(tmp)
        hub.save_torch_state_dict(hf_state, tmp, max_shard_size=max_shard_size)
        transformers.GenerationConfig(
            bos_token_id=bos_id, eos_token_id=eos_id, pad_token_id=eos_id
        ).save_pretrained(tmp)
        fast.save_pretrained(tmp)
        (tmp / "midtrain.json").write_text(
            json.dumps(
                {
                    "source": str(ckpt),
                    "global_step": meta.get("global_step"),
                    "weights": weights,
                    "model_config": asdict(config),
                },
                indent=2,
            )
            + "\n"
        )
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _hf_tokenizer(tok: Tokenizer, source: TokenizerSource, eos: str | None, block_size: int) -> Any:
    """The run's tokenizer as transformers saves it, with its EOS and its BOS (the EOS for a
    tokenizer with no BOS of its own, as GPT-2's and Pythia's), adding the BOS exactly where
    the run's documents had one."""
    transformers = _require("transformers")
    eos_token = _eos_token(tok, eos or source.eos, "--eos")
    bos = source.bos(tok)
    adds = {} if Bos.of(tok).added == bos.added else {"add_bos_token": bos.added}
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=eos_token if bos.id is None else tok.id_to_token(bos.id),
        eos_token=eos_token,
        unk_token=None,
        pad_token=None,
        model_max_length=block_size,
        **adds,
    )
