"""Source records to documents: each record rendered by its domain's template into segments
(text, trained-on), empty ones skipped, and the deterministic train/val split."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from fractions import Fraction

import numpy as np

from midtrain.data.chat import ChatRenderError
from midtrain.data.prepare.plan import Plan
from midtrain.data.sources import record_batches
from midtrain.errors import MidtrainError

Document = tuple[int, list[tuple[str, bool]]]  # (source record index, segments)


def rendered(
    plan: Plan,
    batch_size: int,
    index: int = 0,
    count: int = 1,
) -> Iterator[tuple[list[Document], list[int]]]:
    """Per batch of source records (those of shard ``index`` of ``count``): the documents as
    (record index, segments) and the indices of records skipped as empty or whitespace-only.
    ``max_docs`` counts kept documents of this shard."""
    kept = 0
    first = True
    for start, records in record_batches(
        plan.source, f"{plan.where}.source", batch_size, index, count
    ):
        if first and records:
            plan.template.check(records[0], plan.where)
            first = False
        docs, skipped = [], []
        for k, rec in enumerate(records):
            plan.template.check_values(rec, plan.where, start + k)
            try:
                segments = [(t, train) for t, train in plan.template.segments(rec) if t]
            except ChatRenderError as e:
                raise MidtrainError(
                    f"{plan.where}.chat_template: {e} (record {start + k})"
                ) from None
            if not any(not t.isspace() for t, _ in segments):
                skipped.append(start + k)  # nothing to learn from (e.g. empty source files)
                continue
            docs.append((start + k, segments))
            kept += 1
            if plan.config.max_docs is not None and kept >= plan.config.max_docs:
                yield docs, skipped
                return
        yield docs, skipped


def documents(plan: Plan) -> Iterator[Document]:
    """(record index, segments) of every kept document, in order (the tokenizer's sample)."""
    for docs, _ in rendered(plan, 1000):
        yield from docs


def _split_fraction(fraction: float, seed: int) -> tuple[Fraction, int]:
    f = Fraction(fraction).limit_denominator(1_000_000)
    return f, (seed % f.denominator if f.denominator > 1 else 0)


def validation_split(fraction: float, seed: int) -> Callable[[int], bool]:
    """Record i goes to validation iff floor((i+1+o)f) > floor((i+o)f): exactly round(n f) of
    any n consecutive records, evenly spaced, decided record by record (streaming-friendly).
    Exact rational arithmetic, so 0.3 means 30%; the offset o comes from the seed."""
    f, offset = _split_fraction(fraction, seed)

    def in_val(i: int) -> bool:
        j = i + offset
        return (j + 1) * f.numerator // f.denominator > j * f.numerator // f.denominator

    return in_val


def validation_mask(fraction: float, seed: int, records: np.ndarray) -> np.ndarray:
    """``validation_split`` of many record numbers at once (int64 arithmetic: exact for
    record numbers below 9e12)."""
    f, offset = _split_fraction(fraction, seed)
    j = np.asarray(records, dtype=np.int64) + offset
    num, den = f.numerator, f.denominator
    return (j + 1) * num // den > j * num // den
