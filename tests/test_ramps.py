"""Mixture ramps: every step's counts are the largest-remainder rounding of its interpolated
weights, in every global batch (workers, accumulation, two ranks); plan, curve and refusals."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from midtrain.cli import main
from midtrain.data.datamodule import MixtureDataModule
from midtrain.data.mixture import (
    MixtureSchedule,
    Phase,
    format_plan,
    largest_remainder,
    plan_rows,
    ramp_fraction,
)
from midtrain.errors import MidtrainError
from midtrain.train.callbacks.mixture import MixtureSwitch
from tests.helpers import RecordDomains
from tests.test_midtraining import DOMAINS, per_step_counts, run
from tests.test_mixture import _stream
from tests.test_training import fit_config, scalars

START = {"prose": 0.5, "code": 0.5}
TARGET = {"code": 0.2, "math": 0.8}


def interpolated(step: int, start: int, ramp_steps: int, kind: str) -> np.ndarray:
    a = np.array([START.get(d, 0.0) for d in DOMAINS])
    b = np.array([TARGET.get(d, 0.0) for d in DOMAINS])
    k = step - start
    if k < 0:
        return a
    f = ramp_fraction(min(k, ramp_steps - 1), ramp_steps, kind)
    return (1 - f) * a + f * b


def expected_counts(step: int, batch: int, start: int, ramp_steps: int, kind: str) -> list:
    seed = 0 if step < start else 1  # the tie-break seed of the phase (data seed + index)
    return largest_remainder(interpolated(step, start, ramp_steps, kind), batch, seed).tolist()


@pytest.mark.parametrize("kind", ["linear", "cosine"])
def test_ramp_counts_and_draws_are_exact(kind: str) -> None:
    phases = [Phase(0, START), Phase(3, TARGET, 5, kind)]
    sched = MixtureSchedule(DOMAINS, phases, batch_size=7)
    seen: dict[int, list[int]] = {0: [], 1: [], 2: []}
    for s in range(12):
        assert sched.counts_at(s).tolist() == expected_counts(s, 7, 3, 5, kind), s
        assert np.allclose(sched.weights_row(s), interpolated(s, 3, 5, kind))
        domain, draw = sched.step(s)
        assert np.bincount(domain, minlength=3).tolist() == sched.counts_at(s).tolist()
        for d in seen:
            seen[d] += sorted(draw[domain == d].tolist())
    # draws of a domain are numbered contiguously across the ramp (no block read twice)
    assert all(seen[d] == list(range(len(seen[d]))) for d in seen)
    assert sched.draws_before(12).tolist() == [len(seen[d]) for d in seen]
    assert sched.counts_at(7).tolist() == sched.counts_at(11).tolist() == sched.counts[1].tolist()


def test_ramp_of_one_step_is_the_jump() -> None:
    jump = MixtureSchedule(DOMAINS, [Phase(0, START), Phase(3, TARGET)], 6)
    one = MixtureSchedule(DOMAINS, [Phase(0, START), Phase(3, TARGET, 1)], 6)
    for s in range(6):
        assert all(np.array_equal(a, b) for a, b in zip(jump.step(s), one.step(s), strict=True))


def test_a_later_phase_cuts_a_ramp_short() -> None:
    sched = MixtureSchedule(DOMAINS, [Phase(0, START), Phase(2, TARGET, 10), Phase(5, START)], 8)
    assert sched.ramps == [0, 3, 0]
    assert np.allclose(sched.froms[2], interpolated(4, 2, 10, "linear"))
    assert sched.weights_at(5) == {"prose": 0.5, "code": 0.5, "math": 0.0}


def test_plan_shows_the_ramp_and_the_repeat_check_covers_it() -> None:
    sched = MixtureSchedule(DOMAINS, [Phase(0, START), Phase(2, TARGET, 4)], 10)
    rows = plan_rows(sched, 8, 16, {"prose": 100, "code": 100, "math": 20})
    ramp = [r for r in rows if r["ramp"]]
    assert {(r["start"], r["end"]) for r in ramp} == {(2, 6)}
    math = next(r for r in ramp if r["domain"] == "math")
    assert math["sequences"] == sum(sched.counts_at(s)[2] for s in range(2, 6))
    assert math["per_batch_from"] == sched.counts_at(2)[2] and math["per_batch"] == 8
    text = format_plan(rows, 16)
    assert "2-6 linear" in text and "6-8" in text and "0.200>0.800" in text


@pytest.mark.parametrize("kind", ["linear", "cosine"])
def test_every_global_batch_over_a_ramp_two_ranks(builtin_store: Path, kind: str) -> None:
    dm = MixtureDataModule(str(builtin_store), weights=START, seq_len=32, micro_batch_size=3)
    dm.add_switch(2, TARGET, 8, ramp_steps=4, ramp=kind)
    accumulation, world, steps = 2, 2, 8
    per_step = np.zeros((steps, 3), dtype=int)
    for rank in range(world):
        for i, mb in enumerate(_stream(dm, accumulation, rank, world, 0, steps)):
            per_step[i // accumulation] += np.bincount(mb["domain"].numpy(), minlength=3)
    for s in range(steps):
        assert per_step[s].tolist() == expected_counts(s, 12, 2, 4, kind), s


def test_ramp_is_exact_in_training_with_workers_and_accumulation(
    builtin_store: Path, tmp_path: Path
) -> None:
    rec = RecordDomains()
    switch = MixtureSwitch(TARGET, step=2, ramp_steps=4, ramp="cosine")
    run(
        builtin_store, tmp_path, [rec, switch], max_steps=8, accumulation=2, num_workers=2,
        weights=START,
    )  # fmt: skip
    counts = per_step_counts(rec.rows)
    assert sorted(counts) == list(range(8))
    for s, c in counts.items():  # global batch 3 x 2
        assert c.tolist() == expected_counts(s, 6, 2, 4, "cosine"), s


def test_weight_curve_follows_the_ramp(builtin_store: Path, tmp_path: Path) -> None:
    cfg = fit_config(
        tmp_path, builtin_store, "ramp", max_steps=10, log_every_n_steps=1, limit_val_batches=0
    )
    args = [
        "fit", "--config", str(cfg), "--data.init_args.weights", "{prose: 0.5, code: 0.5}",
        "--trainer.callbacks+=midtrain.callbacks.MixtureSwitch",
        "--trainer.callbacks.weights={code: 0.2, math: 0.8}",
        "--trainer.callbacks.step=3", "--trainer.callbacks.ramp_steps=4",
    ]  # fmt: skip
    assert main(args) == 0
    math = dict(scalars(tmp_path / "ramp")["mixture/weight/math"])
    for s in range(10):
        assert math[s] == pytest.approx(interpolated(s, 3, 4, "linear")[2]), s
    assert 0 < math[3] < math[4] < math[5] < math[6] == pytest.approx(0.8)


@pytest.mark.parametrize(
    "switches,match",
    [
        (lambda: [MixtureSwitch(TARGET, step=2, ramp_steps=-1)], r"\(step=2\).ramp_steps: must"),
        (lambda: [MixtureSwitch(TARGET, step=2, ramp_steps=1.5)], "whole number"),
        (lambda: [MixtureSwitch(TARGET, step=2, ramp_steps=2, ramp="exp")], "ramp: must be one"),
        (lambda: [MixtureSwitch(TARGET, step=2, ramp_steps=4)], "runs past trainer.max_steps=5"),
        (
            lambda: [
                MixtureSwitch(TARGET, step=1, ramp_steps=3),
                MixtureSwitch({"prose": 1}, step=3),
            ],
            r"ramps may not overlap",
        ),
    ],
)
def test_bad_ramps_are_refused(builtin_store: Path, tmp_path: Path, switches, match) -> None:
    with pytest.raises(MidtrainError, match=match) as err:
        run(builtin_store, tmp_path, switches(), max_steps=5)
    assert "\n" not in str(err.value)
    assert not (tmp_path / "checkpoints").exists()
