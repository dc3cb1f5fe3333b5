"""Tokenizers: a tokenizer.json file, a hub tokenizer, or a byte-level BPE trained here."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from midtrain.data.hub import TOKENIZER_FILE
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
        if is_model_spec(hub):
            # a model directory or hub id, optionally @revision: the tokenizer a released
            # model was trained with (resolved the way model.init_from resolves hf:)
            return Tokenizer.from_file(str(model_directory(hub) / TOKENIZER_FILE))
        try:
            return Tokenizer.from_pretrained(hub)
        except Exception as e:  # network, auth or a wrong name: one line either way
            raise MidtrainError(
                f"tokenizer.hub: could not load {hub!r} from the Hugging Face hub ({e}); "
                "check the name and network, or give tokenizer.path"
            ) from None
    raise MidtrainError("tokenizer: give one of `path`, `hub` or `train`")


def is_model_spec(hub: str) -> bool:
    """Whether ``tokenizer.hub`` names a model (``hf:``, ``@revision`` or a local directory),
    whose directory also says its EOS/BOS and chat template, rather than a bare hub name."""
    from midtrain.data.hub import is_hf

    return is_hf(hub) or "@" in hub or Path(hub).is_dir()


def model_directory(hub: str) -> Path:
    """The local directory of the model ``tokenizer.hub`` names (see :func:`is_model_spec`)."""
    from midtrain.data.hub import HF_PREFIX, is_hf, tokenizer_file

    spec = hub if is_hf(hub) else HF_PREFIX + hub
    return tokenizer_file(spec, "tokenizer.hub").parent


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


@dataclass(frozen=True)
class ModelTokens:
    """A released model's token conventions, read from its directory: the EOS that ends a
    document, the BOS in front of one (only where the tokenizer itself adds it), the chat
    template, and the special-token strings a chat template may name."""

    directory: Path
    eos: str | None = None
    bos: str | None = None
    add_bos: bool = False
    chat_template: str | None = None
    special: dict[str, str] = field(default_factory=dict)


def _json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise MidtrainError(f"tokenizer.hub: {path} is not valid JSON ({e})") from None
    return value if isinstance(value, dict) else {}


def _token(value: Any) -> str | None:
    """A tokenizer_config token entry: a string or an AddedToken dict."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) and value else None


def _token_of_id(tok: Tokenizer, *configs: dict[str, Any], key: str) -> str | None:
    """The first of the configs' ``key`` (an id, or a list of ids: the first) as a token."""
    for cfg in configs:
        value = cfg.get(key)
        if isinstance(value, list):
            value = value[0] if value else None
        if isinstance(value, int) and tok.id_to_token(value) is not None:
            return tok.id_to_token(value)
    return None


def _chat_template(directory: Path, tk_config: dict[str, Any]) -> str | None:
    """transformers saves it as chat_template.jinja (v4.43+) or in tokenizer_config.json (a
    string, or named templates of which "default" is the one apply_chat_template uses)."""
    file = directory / "chat_template.jinja"
    if file.is_file():
        return file.read_text(encoding="utf-8")
    value = tk_config.get("chat_template")
    if isinstance(value, list):
        named = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
        value = named.get("default")
    return value if isinstance(value, str) else None


def _adds_bos(tok: Tokenizer, bos: str | None, tk_config: dict[str, Any]) -> bool:
    """Whether the tokenizer puts BOS in front of a text: tokenizer_config's ``add_bos_token``
    when it says so, else what its post-processor does (Llama 3's adds <|begin_of_text|>)."""
    if bos is None or tok.token_to_id(bos) is None:
        return False
    if isinstance(tk_config.get("add_bos_token"), bool):
        return bool(tk_config["add_bos_token"])
    with_special = tok.encode("a", add_special_tokens=True).ids
    return bool(with_special) and with_special[0] == tok.token_to_id(bos)


def post_processor_prefix(tok: Tokenizer) -> list[int]:
    """The token ids the tokenizer's post-processor puts in front of every text (Llama 3's:
    ``<|begin_of_text|>``; most tokenizers: none)."""
    plain = tok.encode("a", add_special_tokens=False).ids
    full = tok.encode("a", add_special_tokens=True).ids
    n = len(full) - len(plain)
    return list(full[:n]) if n > 0 and full[n:] == plain else []


@dataclass(frozen=True)
class Bos:
    """A tokenizer's BOS convention: its BOS token id (None: it has none) and whether a BOS
    starts every text, as the model saw its training documents."""

    id: int | None = None
    added: bool = False

    @classmethod
    def of(cls, tok: Tokenizer, bos_id: int | None = None, added: bool | None = None) -> Bos:
        """The convention recorded (by ``midtrain prepare``, or a model directory), or where
        none is (``added`` None: a store made before it was recorded, a bare tokenizer.json)
        what the tokenizer's post-processor does."""
        if added is None:
            prefix = post_processor_prefix(tok)
            if len(prefix) == 1:
                return cls(prefix[0], True)
            return cls(bos_id, False)
        return cls(bos_id, added and bos_id is not None)


def model_tokens(directory: Path, tok: Tokenizer) -> ModelTokens:
    """EOS and BOS from tokenizer_config.json, else generation_config.json, else config.json
    (ids there); the chat template; the special tokens' strings."""
    tk_config = _json(directory / "tokenizer_config.json")
    configs = (_json(directory / "generation_config.json"), _json(directory / "config.json"))
    eos = _token(tk_config.get("eos_token")) or _token_of_id(tok, *configs, key="eos_token_id")
    bos = _token(tk_config.get("bos_token")) or _token_of_id(tok, *configs, key="bos_token_id")
    special = {
        k: t
        for k in ("bos_token", "eos_token", "unk_token", "pad_token", "sep_token", "cls_token")
        if (t := _token(tk_config.get(k))) is not None
    }
    special.update({"eos_token": eos} if eos else {})
    special.update({"bos_token": bos} if bos else {})
    return ModelTokens(
        directory=directory,
        eos=eos,
        bos=bos,
        add_bos=_adds_bos(tok, bos, tk_config),
        chat_template=_chat_template(directory, tk_config),
        special=special,
    )
