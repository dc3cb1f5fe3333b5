"""midtrain: a Lightning-based trainer for midtraining research on language models."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["GPT", "PRESETS", "CausalLM", "MixtureDataModule", "ModelConfig", "SFTDataModule"]

# Public names resolve lazily, so `midtrain --help` or `midtrain.data.builtin` do not import torch.
_LAZY = {
    "CausalLM": "midtrain.train.module",
    "MixtureDataModule": "midtrain.data.datamodule",
    "SFTDataModule": "midtrain.data.sft",
    "GPT": "midtrain.model",
    "PRESETS": "midtrain.model",
    "ModelConfig": "midtrain.model",
}

if TYPE_CHECKING:
    from midtrain.data.datamodule import MixtureDataModule
    from midtrain.data.sft import SFTDataModule
    from midtrain.model.config import PRESETS, ModelConfig
    from midtrain.model.gpt import GPT
    from midtrain.train.module import CausalLM


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'midtrain' has no attribute {name!r}")
