"""The mixture schedule and the training stream: exact counts, determinism, cheap resume."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from midtrain.data.datamodule import MixtureDataModule
from midtrain.data.mixture import MixtureSchedule, Phase, largest_remainder, permute
from midtrain.data.streams import BatchLayout, MixtureStream
from midtrain.errors import MidtrainError


@pytest.mark.parametrize(
    "weights,total", [([0.6, 0.3, 0.1], 16), ([1, 1, 1], 4), ([0.2, 0.8], 1024), ([5, 0, 1e-3], 7)]
)
def test_largest_remainder_is_exact_rounding(weights: list[float], total: int) -> None:
    w = np.asarray(weights, dtype=float)
    counts = largest_remainder(w, total, seed=0)
    quota = w / w.sum() * total
    assert counts.sum() == total
    assert np.all((counts == np.floor(quota)) | (counts == np.ceil(quota)))


@pytest.mark.parametrize("n", [1, 2, 7, 100, 1000, 4097])
def test_permute_is_a_bijection(n: int) -> None:
    out = permute(np.arange(n), n, key=1234)
    assert sorted(out.tolist()) == list(range(n))
    if n > 10:
        assert not np.array_equal(out, np.arange(n))
        assert not np.array_equal(out, permute(np.arange(n), n, key=99))


def _stream(
    dm: MixtureDataModule, accumulation: int, rank: int, world: int, start: int, max_steps: int
) -> MixtureStream:
    sched = dm.schedule(dm.micro_batch_size * accumulation * world)
    return MixtureStream(
        [dm.store.domain(n).train for n in sched.domains],
        sched,
        dm.seq_len,
        BatchLayout(dm.micro_batch_size, accumulation, rank, world),
        start,
        max_steps,
    )


def test_every_global_batch_has_the_rounded_counts(builtin_store: Path) -> None:
    weights = {"prose": 0.5, "code": 0.3, "math": 0.2}
    dm = MixtureDataModule(str(builtin_store), weights=weights, seq_len=32, micro_batch_size=3)
    accumulation, world, steps = 2, 2, 6
    batch = dm.micro_batch_size * accumulation * world  # 12
    expected = largest_remainder(np.array([0.5, 0.3, 0.2]), batch, seed=0)
    per_step = np.zeros((steps, 3), dtype=int)
    for rank in range(world):
        for i, mb in enumerate(_stream(dm, accumulation, rank, world, 0, steps)):
            per_step[i // accumulation] += np.bincount(mb["domain"].numpy(), minlength=3)
    assert (per_step == expected).all()
    # realized fraction within one sequence per global batch of the weights
    assert np.all(np.abs(per_step / batch - np.array([0.5, 0.3, 0.2])) <= 1 / batch)


def test_stream_is_identical_for_any_num_workers(builtin_store: Path) -> None:
    dm = MixtureDataModule(str(builtin_store), seq_len=32, micro_batch_size=4)
    stream = _stream(dm, 2, 0, 1, 0, 5)
    plain = [b["input_ids"] for b in DataLoader(stream, batch_size=None)]
    workers = [
        b["input_ids"]
        for b in DataLoader(stream, batch_size=None, num_workers=2, prefetch_factor=3)
    ]
    assert len(plain) == len(workers) == 10
    assert all(torch.equal(a, b) for a, b in zip(plain, workers, strict=True))


def test_resume_at_step_k_continues_the_same_stream(builtin_store: Path) -> None:
    dm = MixtureDataModule(str(builtin_store), seq_len=32, micro_batch_size=4)
    full = [b["input_ids"] for b in _stream(dm, 3, 0, 1, 0, 8)]
    tail = [b["input_ids"] for b in _stream(dm, 3, 0, 1, 5, 8)]
    assert len(tail) == 9
    assert all(torch.equal(a, b) for a, b in zip(full[15:], tail, strict=True))


def test_blocks_are_consecutive_tokens_of_one_domain(builtin_store: Path) -> None:
    dm = MixtureDataModule(str(builtin_store), seq_len=32, micro_batch_size=8)
    stream = _stream(dm, 1, 0, 1, 0, 2)
    mb = stream.micro_batch(0)
    assert torch.equal(mb["input_ids"][:, 1:], mb["targets"][:, :-1])
    for row, d in zip(mb["input_ids"], mb["domain"], strict=True):
        tokens = np.asarray(stream.splits[d].tokens)
        starts = np.flatnonzero(tokens[: len(tokens) - 32] == row[0].item())
        assert any(np.array_equal(tokens[s : s + 32], row.numpy()) for s in starts)


def test_each_epoch_of_a_domain_reads_every_block_once(builtin_store: Path) -> None:
    sched = MixtureSchedule(["a"], [Phase(0, {"a": 1.0})], batch_size=5, seed=3)
    from midtrain.data.mixture import block_indices

    draws = np.concatenate([sched.step(s)[1] for s in range(8)])  # 40 draws
    blocks = block_indices(draws, num_blocks=13, seed=3, domain_id=0)
    for e in range(3):
        assert sorted(blocks[e * 13 : (e + 1) * 13].tolist()) == list(range(13))


def test_schedule_phases_and_closed_form_counts() -> None:
    sched = MixtureSchedule(
        ["a", "b"], [Phase(0, {"a": 1.0}), Phase(4, {"a": 1, "b": 1})], batch_size=6
    )
    assert sched.weights_at(3) == {"a": 1.0, "b": 0.0}
    assert sched.weights_at(4) == {"a": 0.5, "b": 0.5}
    assert sched.draws_before(10).tolist() == [4 * 6 + 6 * 3, 6 * 3]
    # draws within a domain are numbered contiguously across steps and phases
    seen = {0: [], 1: []}
    for s in range(10):
        d, n = sched.step(s)
        for k in (0, 1):
            seen[k] += sorted(n[d == k].tolist())
    assert seen[0] == list(range(42)) and seen[1] == list(range(18))
    with pytest.raises(MidtrainError, match="two phases start at step 4"):
        MixtureSchedule(["a"], [Phase(0, {"a": 1}), Phase(4, {"a": 1}), Phase(4, {"a": 2})], 2)


def test_block_order_key_is_order_sensitive() -> None:
    from midtrain.data.mixture import block_indices

    draws = np.arange(50)
    # (seed 0, epoch 1) and (seed 1, epoch 0) must not share a permutation
    a = block_indices(draws + 50, 50, seed=0, domain_id=7)
    b = block_indices(draws, 50, seed=1, domain_id=7)
    assert not np.array_equal(a, b)
