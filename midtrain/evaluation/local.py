"""A light downstream runner for local JSONL tasks, no lm-eval needed: multiple choice (``acc``,
``acc_norm``: the choice with the highest summed log-prob, raw and per byte, as lm-eval) and
exact match (greedy generation until a stop string, compared after stripping whitespace).

A task, as a dict (e.g. in ``DownstreamEval(tasks=[...])``)::

    {name: arith, path: arith.jsonl, kind: multiple_choice,
     context: "Question: {question}\\nAnswer:", choices: choices, answer: label}
    {name: arith_gen, path: arith.jsonl, kind: exact_match,
     context: "Question: {question}\\nAnswer:", answer: answer, stop: ["\\n"]}

``context`` is a ``str.format`` template over each JSON line; ``choices`` names a list field;
``answer`` names the gold index (multiple choice) or gold string (exact match). Each choice is
scored as ``target_delimiter + choice`` (default one space), as lm-eval's multiple choice.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from midtrain.errors import MidtrainError
from midtrain.evaluation.scoring import continuation_logprobs
from midtrain.model.generation import Sampling, generate_ids
from midtrain.model.gpt import GPT

if TYPE_CHECKING:
    from tokenizers import Tokenizer

KINDS = ("multiple_choice", "exact_match")


@dataclass
class LocalTask:
    name: str
    path: str
    kind: str
    context: str
    answer: str
    choices: str | None = None
    target_delimiter: str = " "
    stop: list[str] = field(default_factory=lambda: ["\n"])
    max_new_tokens: int = 32

    @classmethod
    def from_dict(cls, spec: dict[str, Any], where: str) -> LocalTask:
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(spec) - known)
        if unknown:
            raise MidtrainError(f"{where}: unknown key {unknown[0]!r}; keys: {', '.join(known)}")
        missing = [k for k in ("name", "path", "kind", "context", "answer") if k not in spec]
        if missing:
            raise MidtrainError(f"{where}: missing key {missing[0]!r}")
        task = cls(**spec)
        if task.kind not in KINDS:
            raise MidtrainError(f"{where}.kind: {task.kind!r} is not one of {', '.join(KINDS)}")
        if task.kind == "multiple_choice" and not task.choices:
            raise MidtrainError(f"{where}.choices: a multiple_choice task names its choices field")
        if not Path(task.path).is_file():
            raise MidtrainError(f"{where}.path: file not found: {task.path}")
        return task

    def examples(self, limit: int | None = None) -> list[dict[str, Any]]:
        rows = []
        with open(self.path, encoding="utf-8") as f:
            for n, line in enumerate(f, start=1):
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError as e:
                        raise MidtrainError(f"{self.path}:{n}: not JSON ({e})") from None
                if limit is not None and len(rows) >= limit:
                    break
        return rows

    def evaluate(
        self,
        model: GPT,
        tokenizer: Tokenizer,
        eos_id: int | None,
        limit: int | None = None,
        batch_size: int = 8,
    ) -> dict[str, float]:
        rows = self.examples(limit)
        if not rows:
            raise MidtrainError(f"{self.path}: no examples")
        try:
            contexts = [self.context.format(**r) for r in rows]
            golds = [r[self.answer] for r in rows]
            choices = [list(r[self.choices]) for r in rows] if self.choices else []
        except KeyError as e:
            raise MidtrainError(f"{self.path}: field {e} missing (task {self.name})") from None
        encode = lambda s: tokenizer.encode(s, add_special_tokens=False).ids  # noqa: E731
        if self.kind == "multiple_choice":
            pairs: list[tuple[list[int], list[int]]] = []
            spans: list[tuple[int, int]] = []
            for ctx, options in zip(contexts, choices, strict=True):
                start = len(pairs)
                for option in options:  # split the whole string at the context, as lm-eval
                    ctx_ids = encode(ctx)
                    whole = encode(ctx + self.target_delimiter + option)
                    pairs.append((ctx_ids, whole[len(ctx_ids) :]))
                spans.append((start, len(pairs)))
            scores = continuation_logprobs(model, pairs, batch_size)
            acc = acc_norm = 0.0
            for (a, b), options, gold in zip(spans, choices, golds, strict=True):
                lps = [lp for lp, _ in scores[a:b]]
                norm = [
                    lp / len((self.target_delimiter + o).encode())
                    for lp, o in zip(lps, options, strict=True)
                ]
                acc += float(max(range(len(lps)), key=lps.__getitem__) == int(gold))
                acc_norm += float(max(range(len(norm)), key=norm.__getitem__) == int(gold))
            return {"acc": acc / len(rows), "acc_norm": acc_norm / len(rows)}
        stops = list(self.stop)
        sampling = Sampling(
            max_new_tokens=self.max_new_tokens,
            stop=stops,
            stop_ids=[eos_id] if eos_id is not None else [],
        )
        vocab = min(model.config.padded_vocab_size, tokenizer.get_vocab_size(True))
        decode = lambda ids: tokenizer.decode(ids, skip_special_tokens=False)  # noqa: E731
        limit_ctx = model.config.block_size - self.max_new_tokens
        hits = 0.0
        for start in range(0, len(rows), batch_size):
            batch = [encode(c)[-limit_ctx:] for c in contexts[start : start + batch_size]]
            for ids, gold in zip(
                generate_ids(model, batch, sampling, vocab, decode=decode),
                golds[start : start + batch_size],
                strict=True,
            ):
                text = decode(ids)
                for term in stops:
                    text = text.split(term)[0]
                hits += float(text.strip() == str(gold).strip())
        return {"exact_match": hits / len(rows)}
