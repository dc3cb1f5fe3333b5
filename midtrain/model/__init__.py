"""The model: plain PyTorch, no Lightning and no distributed code woven in.

``config`` (``ModelConfig`` and the named presets), ``gpt`` (the transformer), ``loss`` (the
chunked cross-entropy), ``generation`` (KV-cache decoding), ``parallelize`` (FSDP2, activation
checkpointing and compile, applied to a built model from outside), ``hf`` (the mapping to and
from Hugging Face ``transformers`` models). May import ``midtrain.errors`` and
``midtrain.data`` (where an ``hf:`` model lives, its tokenizer); nothing above.
"""

from midtrain.model.config import PRESETS, ModelConfig
from midtrain.model.gpt import GPT

__all__ = ["GPT", "PRESETS", "ModelConfig"]
