"""Text generation from a ``GPT``: greedy or sampled (temperature, top-k, top-p, seed), stop
tokens and stop strings, batched prompts, with a KV cache (``GPT.forward_cached``) so the cost
of each new token does not grow with the prompt length.

A batch is left-padded: every row's real tokens end at the same column, each row keeps its own
rotary positions, and padding is masked out of attention, so each row generates exactly what it
would alone.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from midtrain.errors import MidtrainError
from midtrain.model.gpt import GPT

if TYPE_CHECKING:
    from tokenizers import Tokenizer

Decode = Callable[[list[int]], str]  # token ids -> text (for stop strings)


@dataclass
class Sampling:
    """How the next token is chosen. ``temperature`` 0 means greedy (argmax)."""

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None
    stop_ids: list[int] = field(default_factory=list)  # e.g. the EOS id; not part of the output
    stop: list[str] = field(default_factory=list)  # stop strings (need a tokenizer)

    def check(self) -> None:
        if self.max_new_tokens < 0:
            raise MidtrainError(f"max_new_tokens: must be >= 0, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise MidtrainError(f"temperature: must be >= 0, got {self.temperature}")
        if self.top_k is not None and self.top_k <= 0:
            raise MidtrainError(f"top_k: must be positive, got {self.top_k}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise MidtrainError(f"top_p: must be in (0, 1], got {self.top_p}")


def _next_token(
    logits: torch.Tensor, s: Sampling, generator: torch.Generator | None
) -> torch.Tensor:
    """(B, V) float logits -> (B,) token ids."""
    if s.temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits / s.temperature
    if s.top_k is not None and s.top_k < logits.size(-1):
        kth = torch.topk(logits, s.top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if s.top_p is not None and s.top_p < 1:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) >= s.top_p  # keep the smallest set reaching top_p
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    probs = logits.softmax(-1)
    return torch.multinomial(probs.cpu(), 1, generator=generator).squeeze(-1).to(logits.device)


def _generator(seed: int | None) -> torch.Generator | None:
    return None if seed is None else torch.Generator().manual_seed(seed)


@torch.no_grad()
def generate_ids(
    model: GPT,
    prompts: Sequence[Sequence[int]],
    sampling: Sampling,
    vocab_size: int | None = None,
    use_cache: bool = True,
    decode: Decode | None = None,
) -> list[list[int]]:
    """New token ids for each prompt (stop ids and anything after a stop string cut off).

    ``vocab_size`` restricts choices to real tokens (the embedding may be padded); ``decode``
    (ids -> str) is needed for stop strings. ``use_cache=False`` recomputes the whole sequence
    every step: the reference the cached path is tested against.
    """
    sampling.check()
    if not prompts or any(len(p) == 0 for p in prompts):
        raise MidtrainError("prompt: every prompt needs at least one token")
    if sampling.stop and decode is None:
        raise MidtrainError("stop: stop strings need a tokenizer")
    limit = model.config.block_size
    longest = max(len(p) for p in prompts)
    if longest + sampling.max_new_tokens > limit:
        raise MidtrainError(
            f"max_new_tokens: prompt of {longest} tokens + "
            f"{sampling.max_new_tokens} new is beyond the model context {limit}"
        )
    was_training = model.training
    model.eval()
    try:
        if use_cache:
            out = _generate_cached(model, prompts, sampling, vocab_size, decode)
        else:
            out = [_generate_uncached(model, p, sampling, vocab_size, decode) for p in prompts]
    finally:
        model.train(was_training)
    return out


def _stopped(ids: list[int], s: Sampling, decode: Decode | None) -> tuple[bool, list[int]]:
    """Whether a row is done, and its output cut at the stop (the stop itself excluded)."""
    if ids and ids[-1] in s.stop_ids:
        return True, ids[:-1]
    if s.stop and decode is not None:  # generate_ids refuses stop strings without it
        text = decode(ids)
        hits = [text.find(x) for x in s.stop if x in text]
        if hits:
            return True, ids  # the text is cut at the stop string by generate_text
    return False, ids


def _generate_uncached(
    model: GPT, prompt: Sequence[int], s: Sampling, vocab_size: int | None, decode: Decode | None
) -> list[int]:
    device = model.embed.weight.device
    generator = _generator(s.seed)
    seq, new = list(prompt), []
    for _ in range(s.max_new_tokens):
        logits = model(torch.tensor([seq], device=device))[:, -1].float()
        if vocab_size is not None:
            logits = logits[:, :vocab_size]
        token = int(_next_token(logits, s, generator)[0])
        seq.append(token)
        new.append(token)
        done, new = _stopped(new, s, decode)
        if done:
            break
    return new


def _generate_cached(
    model: GPT,
    prompts: Sequence[Sequence[int]],
    s: Sampling,
    vocab_size: int | None,
    decode: Decode | None,
) -> list[list[int]]:
    device = model.embed.weight.device
    generator = _generator(s.seed)
    B, longest = len(prompts), max(len(p) for p in prompts)
    idx = torch.zeros(B, longest, dtype=torch.long, device=device)
    key_mask = torch.zeros(B, longest + s.max_new_tokens, dtype=torch.bool, device=device)
    for i, p in enumerate(prompts):  # left padding: every prompt ends at column `longest`
        idx[i, longest - len(p) :] = torch.tensor(list(p), dtype=torch.long)
        key_mask[i, longest - len(p) :] = True
    key_mask[:, longest:] = True  # generated tokens are real in every row
    lengths = torch.tensor([len(p) for p in prompts], device=device)
    positions = (
        torch.arange(longest, device=device)[None] - (longest - lengths)[:, None]
    ).clamp_min(0)
    cache = model.new_kv_cache(B, longest + s.max_new_tokens)
    outputs: list[list[int]] = [[] for _ in range(B)]
    done = [False] * B
    if s.max_new_tokens == 0:
        return outputs
    logits = model.forward_cached(idx, cache, positions, key_mask[:, :longest])[:, -1].float()
    pos = lengths.clone()
    for step in range(s.max_new_tokens):
        if vocab_size is not None:
            logits = logits[:, :vocab_size]
        tokens = _next_token(logits, s, generator)
        for i in range(B):
            if not done[i]:
                outputs[i].append(int(tokens[i]))
                done[i], outputs[i] = _stopped(outputs[i], s, decode)
        if all(done) or step == s.max_new_tokens - 1:
            break
        width = longest + step + 1
        logits = model.forward_cached(tokens[:, None], cache, pos[:, None], key_mask[:, :width])[
            :, -1
        ].float()
        pos += 1
    return outputs


def generate_text(
    model: GPT,
    tokenizer: Tokenizer,
    prompts: Sequence[str],
    sampling: Sampling,
    vocab_size: int | None = None,
    use_cache: bool = True,
) -> list[str]:
    """Completions (text after each prompt) with a ``tokenizers.Tokenizer``; the output stops
    before the first stop string or stop id."""
    encoded = [tokenizer.encode(p).ids for p in prompts]

    def decode(ids: list[int]) -> str:
        return tokenizer.decode(ids, skip_special_tokens=False)

    ids = generate_ids(model, encoded, sampling, vocab_size, use_cache, decode)
    texts = []
    for row in ids:
        text = decode(row)
        cuts = [text.find(x) for x in sampling.stop if x in text]
        texts.append(text[: min(cuts)] if cuts else text)
    return texts


def complete(
    model: GPT,
    tokenizer: Tokenizer,
    prompts: Sequence[str],
    eos_id: int | None,
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    stop: Sequence[str] | None = None,
    stop_at_eos: bool = True,
) -> list[str]:
    """``generate_text`` with a model's tokenizer: stops at its EOS (``eos_id``; by default
    the tokenizer's ``DEFAULT_EOS``), samples only ids both the model and the tokenizer have."""
    if eos_id is None:
        from midtrain.data.tokenizer import DEFAULT_EOS

        eos_id = tokenizer.token_to_id(DEFAULT_EOS)
    sampling = Sampling(
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        seed=seed,
        stop=list(stop or []),
        stop_ids=[eos_id] if stop_at_eos and eos_id is not None else [],
    )
    vocab = min(model.config.padded_vocab_size, tokenizer.get_vocab_size(with_added_tokens=True))
    return generate_text(model, tokenizer, list(prompts), sampling, vocab_size=vocab)
