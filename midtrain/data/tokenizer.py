"""Tokenizers: a tokenizer.json file, a hub tokenizer, or a byte-level BPE trained here."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from midtrain.errors import MidtrainError

DEFAULT_EOS = "<|endoftext|>"


def load_tokenizer(path: str | None = None, hub: str | None = None) -> Tokenizer:
    if path is not None:
        if not Path(path).is_file():
            raise MidtrainError(f"tokenizer.path: file not found: {path}")
        try:
            return Tokenizer.from_file(str(path))
        except Exception as e:  # any JSON that is not a tokenizer: name the file and the cause
            cause = " ".join(str(e).split()) or type(e).__name__
            raise MidtrainError(
                f"tokenizer.path: {path} is not a tokenizer.json ({cause}); give a file saved "
                "by the `tokenizers` library (e.g. a hub model's tokenizer.json)"
            ) from None
    if hub is not None:
        if hub.startswith("hf:") or "@" in hub or Path(hub).is_dir():
            # a model directory or hub id, optionally @revision: the tokenizer a released
            # model was trained with (resolved the way model.init_from resolves hf:)
            from midtrain.data.hub import HF_PREFIX, tokenizer_file

            spec = hub if hub.startswith(HF_PREFIX) else HF_PREFIX + hub
            return Tokenizer.from_file(str(tokenizer_file(spec, "tokenizer.hub")))
        try:
            return Tokenizer.from_pretrained(hub)
        except Exception as e:  # network, auth or a wrong name: one line either way
            raise MidtrainError(
                f"tokenizer.hub: could not load {hub!r} from the Hugging Face hub ({e}); "
                "check the name and network, or give tokenizer.path"
            ) from None
    raise MidtrainError("tokenizer: give one of `path`, `hub` or `train`")


def train_bpe(
    texts: Iterable[str], vocab_size: int, eos: str = DEFAULT_EOS, min_frequency: int = 2
) -> Tokenizer:
    """Byte-level BPE: no normaliser and no prefix space, so decode(encode(x)) == x exactly."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=[eos],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def tokenizer_hash(tok: Tokenizer) -> str:
    return hashlib.sha256(tok.to_str().encode()).hexdigest()[:16]


def eos_id(tok: Tokenizer, eos: str) -> int:
    i = tok.token_to_id(eos)
    if i is None:
        raise MidtrainError(
            f"tokenizer.eos: token {eos!r} is not in the tokenizer's vocabulary; "
            "set tokenizer.eos to its end-of-text token"
        )
    return i
