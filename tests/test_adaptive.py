"""AdaptiveMixture: the rules' math, decisions at the documented steps in a real fit, exact
resume (SIGKILL included) and forks, and one-line refusals of bad settings."""

from __future__ import annotations

import json
import os
import re
import signal
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from midtrain import CausalLM, MixtureDataModule
from midtrain.cli import main
from midtrain.data.mixture import largest_remainder
from midtrain.errors import MidtrainError
from midtrain.train.callbacks.adaptive import AdaptiveMixture, bounded, multiplicative_update
from midtrain.train.callbacks.checkpoints import ModelCheckpoint
from midtrain.train.trainer import Trainer
from tests.helpers import RecordDomains, fit_or_fork
from tests.test_bad_input import assert_untouched, error_line, snapshot
from tests.test_kill_resume import config as kill_config
from tests.test_kill_resume import finish, midtrain
from tests.test_midtraining import DOMAINS, TINY, per_step_counts
from tests.test_training import fit_config, scalars

START = {"prose": 0.4, "code": 0.3, "math": 0.3}
# code is far above its reference, the others below theirs: only code has excess loss
REFERENCE = {"prose": 100.0, "code": 0.0, "math": 100.0}


def weights_of(ckpt: Path) -> dict[str, torch.Tensor]:
    return torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]


def fit(
    store: Path,
    root: Path,
    callbacks: list,
    max_steps: int = 8,
    ckpt_path: str | None = None,
    fork_step: int | None = None,
    **trainer_kwargs,
) -> tuple[Trainer, MixtureDataModule]:
    dm = MixtureDataModule(str(store), weights=START, seq_len=16, micro_batch_size=4)
    torch.manual_seed(0)
    model = CausalLM(arch="tiny", model_config=TINY, vocab_size=dm.vocab_size, lr=1e-3, warmup=0)
    trainer = Trainer(
        accelerator="cpu",
        max_steps=max_steps,
        default_root_dir=str(root),
        logger=False,
        log_every_n_steps=1,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        callbacks=[
            ModelCheckpoint(
                dirpath=str(root / "checkpoints"),
                save_last=True,
                save_top_k=-1,
                every_n_train_steps=1,
            ),
            *callbacks,
        ],  # fmt: skip
        **trainer_kwargs,
    )
    fit_or_fork(trainer, model, dm, ckpt_path, fork_step)
    return trainer, dm


# -- the rules' math ---------------------------------------------------------------------------


def test_bounded_sums_to_one_inside_the_bounds() -> None:
    rng = np.random.default_rng(0)
    for _ in range(300):
        n = int(rng.integers(2, 6))
        w = rng.dirichlet(np.ones(n)) * (rng.random(n) > 0.2)
        lo = rng.random(n) * 0.9 / n
        hi = np.maximum(lo, rng.random(n))
        if hi.sum() < 1:
            continue
        out = bounded(w, lo, hi)
        assert out.sum() == pytest.approx(1.0, abs=1e-12)
        assert np.all(out >= lo - 1e-12) and np.all(out <= hi + 1e-12)
        free = (out > lo + 1e-9) & (out < hi - 1e-9) & (w > 0)
        if free.sum() > 1:  # proportions among unclipped domains are kept
            ratio = out[free] / w[free]
            assert np.allclose(ratio, ratio[0])
    assert bounded(np.array([1.0, 0.0, 0.0]), np.zeros(3), np.full(3, 0.4)).tolist() == [
        0.4,
        0.3,
        0.3,
    ]


def test_excess_loss_moves_weight_to_the_domain_above_its_reference() -> None:
    cb = AdaptiveMixture("excess_loss", reference=REFERENCE)
    cb.domains = DOMAINS
    scores = cb.scores({"prose": 3.0, "code": 3.5, "math": 2.0})
    assert scores.tolist() == [0.0, 3.5, 0.0]
    w = np.array([0.4, 0.3, 0.3])
    new = multiplicative_update(w, scores, 0.5, w, 0.0, np.zeros(3), np.ones(3))
    assert new.sum() == pytest.approx(1.0) and new[1] > w[1]
    assert new[0] / new[2] == pytest.approx(w[0] / w[2])  # no excess: ratios unchanged
    # the DoReMi update itself: w * exp(eta * excess), normalised
    expected = w * np.exp(0.5 * scores)
    assert np.allclose(new, expected / expected.sum())
    # a ceiling holds it back; a floor keeps the others in; smoothing pulls toward the start
    capped = multiplicative_update(w, scores, 5.0, w, 0.0, np.full(3, 0.15), np.full(3, 0.6))
    assert capped.tolist() == pytest.approx([0.4 * 0.4 / 0.7, 0.6, 0.3 * 0.4 / 0.7])
    smooth = multiplicative_update(w, scores, 5.0, w, 0.5, np.zeros(3), np.ones(3))
    assert (
        w[1] < smooth[1] < multiplicative_update(w, scores, 5.0, w, 0, np.zeros(3), np.ones(3))[1]
    )


def test_thompson_is_deterministic_per_seed_and_rewards_improvement() -> None:
    def draws(seed: int) -> list[list[float]]:
        cb = AdaptiveMixture("thompson", seed=seed)
        cb.domains, cb.alpha, cb.beta = (
            DOMAINS,
            dict.fromkeys(DOMAINS, 1.0),
            dict.fromkeys(DOMAINS, 1.0),
        )
        out = []
        for k in range(6):  # code improves every time, math never
            losses = {"prose": 3.0, "code": 3.0 - 0.1 * k, "math": 3.0 + 0.1 * k}
            out.append(cb.scores(losses).tolist())
            cb.seen = {d: [float(k), v] for d, v in losses.items()}
        assert cb.alpha["code"] == 6.0 and cb.beta["code"] == 1.0
        assert cb.alpha["math"] == 1.0 and cb.beta["math"] == 6.0
        return out

    assert draws(3) == draws(3)
    assert draws(3) != draws(4)
    assert np.mean([d[1] for d in draws(3)[3:]]) > np.mean([d[2] for d in draws(3)[3:]])


# -- a real fit ----------------------------------------------------------------------------------


def test_decisions_apply_at_the_documented_steps(builtin_store: Path, tmp_path: Path) -> None:
    rec = RecordDomains()
    adaptive = AdaptiveMixture(
        "excess_loss", every_n_steps=2, reference=REFERENCE, step_size=0.2, floor=0.1
    )
    _, dm = fit(builtin_store, tmp_path, [rec, adaptive], max_steps=9)
    history = adaptive.history
    # before steps 2, 4, 6 (not 8: nothing would follow), from step G's own losses of G - 1;
    # no loader workers: in force from G + 1
    assert [(h["step"], h["effective"]) for h in history] == [(2, 3), (4, 5), (6, 7)]
    code = [START["code"]] + [h["weights"]["code"] for h in history]
    assert code == sorted(code) and code[-1] > START["code"]  # toward the excess loss
    for h in history:
        assert sum(h["weights"].values()) == pytest.approx(1.0)
        assert min(h["weights"].values()) >= 0.1 - 1e-12
    counts = per_step_counts(rec.rows)
    assert sorted(counts) == list(range(9))
    for s, c in counts.items():
        phase = sum(h["effective"] <= s for h in history)
        w = START if phase == 0 else history[phase - 1]["weights"]
        expected = largest_remainder(np.array([w[d] for d in DOMAINS]), 4, seed=phase)
        assert c.tolist() == expected.tolist(), s
        assert dm.weights_at(s) == pytest.approx({d: w[d] / sum(w.values()) for d in DOMAINS})


def test_cli_config_logs_every_decision(
    builtin_store: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    cfg = fit_config(tmp_path, builtin_store, "cli", max_steps=8, limit_val_batches=0)
    raw = yaml.safe_load(cfg.read_text())
    raw["data"]["init_args"]["weights"] = START
    raw["trainer"]["callbacks"] = [
        {
            "class_path": "midtrain.callbacks.AdaptiveMixture",
            "init_args": {"rule": "thompson", "every_n_steps": 3, "seed": 1, "step_size": 2.0},
        }
    ]
    cfg.write_text(yaml.safe_dump(raw))
    assert main(["fit", "--config", str(cfg)]) == 0
    ckpt = torch.load(tmp_path / "cli" / "checkpoints" / "last.ckpt", weights_only=True)
    history = ckpt["callbacks"]["AdaptiveMixture"]["history"]
    assert [(h["step"], h["effective"]) for h in history] == [(3, 4), (6, 7)]
    tags = scalars(tmp_path / "cli")
    for d in DOMAINS:
        curve = dict(tags[f"mixture/weight/{d}"])
        assert curve[3] == pytest.approx(START[d])
        for h in history:
            assert curve[h["effective"]] == pytest.approx(h["weights"][d])
    # a resume with other settings is refused in one line, before anything is written
    before = snapshot(tmp_path / "cli")
    capsys.readouterr()
    raw["trainer"]["callbacks"][0]["init_args"]["seed"] = 2
    other = tmp_path / "other.yaml"
    other.write_text(yaml.safe_dump(raw))
    assert main(["fit", "--config", str(other), "--ckpt_path", "last"]) == 2
    line = error_line(capsys.readouterr().err, "fit")
    assert "AdaptiveMixture.seed: the checkpoint's AdaptiveMixture had 1, this run has 2" in line
    assert_untouched(before, snapshot(tmp_path / "cli"))


# -- resume and fork -----------------------------------------------------------------------------


def test_resume_and_fork_replay_the_decisions(builtin_store: Path, tmp_path: Path) -> None:
    def adaptive() -> AdaptiveMixture:
        return AdaptiveMixture("thompson", every_n_steps=2, seed=5, floor=0.05)

    parent = adaptive()
    fit(builtin_store, tmp_path / "a", [parent], max_steps=8)
    ref = weights_of(tmp_path / "a" / "checkpoints" / "last.ckpt")
    # step=4: saved after step 3, a logging step whose losses the decision before step 4 reads
    # (the checkpoint carries them); step=5: saved with that decision's change pending
    for name in ("epoch=0-step=4.ckpt", "epoch=0-step=5.ckpt"):
        point = str(tmp_path / "a" / "checkpoints" / name)
        resumed = adaptive()
        fit(builtin_store, tmp_path / f"r{name}", [resumed], max_steps=8, ckpt_path=point)
        assert resumed.history == parent.history
        out = weights_of(tmp_path / f"r{name}" / "checkpoints" / "last.ckpt")
        assert all(torch.equal(ref[k], out[k]) for k in ref), name
    # a fork from step 4 with the same settings reproduces its parent bit for bit
    forked = adaptive()
    point = str(tmp_path / "a" / "checkpoints" / "epoch=0-step=4.ckpt")
    fit(builtin_store, tmp_path / "f", [forked], max_steps=8, ckpt_path=point, fork_step=4)
    assert forked.history == parent.history
    out = weights_of(tmp_path / "f" / "checkpoints" / "last.ckpt")
    assert all(torch.equal(ref[k], out[k]) for k in ref)
    # another setting on a plain resume is refused in one line
    with pytest.raises(MidtrainError, match=r"AdaptiveMixture.seed: .* --fork") as err:
        fit(builtin_store, tmp_path / "x", [AdaptiveMixture("thompson", every_n_steps=2,
            seed=6, floor=0.05)], max_steps=8, ckpt_path=point)  # fmt: skip
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(
    "rule,num_workers,accumulation",
    [
        # minutes each on a shared CPU: test_resume_and_fork_replay_the_decisions covers the
        # same resume points in-process, in the default suite
        pytest.param("excess_loss", 0, 1, id="excess_loss", marks=pytest.mark.slow),
        pytest.param(
            "thompson", 2, 2, id="thompson-workers2-accumulation2", marks=pytest.mark.slow
        ),
    ],
)
def test_sigkill_mid_adaptive_run_then_resume_is_bitwise_exact(
    tmp_path: Path, builtin_store: Path, rule: str, num_workers: int, accumulation: int
) -> None:
    def cfg(run: str, slow: float) -> Path:
        path = kill_config(tmp_path, builtin_store, run, num_workers, accumulation, 1, slow)
        raw = yaml.safe_load(path.read_text())
        raw["trainer"]["log_every_n_steps"] = 1
        raw["data"]["init_args"]["weights"] = START
        args = {"rule": rule, "every_n_steps": 2, "seed": 7, "reference": REFERENCE, "floor": 0.05}
        if rule == "thompson":
            del args["reference"]
        raw["trainer"]["callbacks"] = [
            {"class_path": "midtrain.callbacks.AdaptiveMixture", "init_args": args},
            {"class_path": "tests.helpers.SlowDown", "init_args": {"seconds": slow}},
        ]
        path.write_text(yaml.safe_dump(raw))
        return path

    finish(midtrain("fit", "--config", str(cfg("ref", 0.0))))
    run = cfg("run", 0.3)
    proc = midtrain("fit", "--config", str(run))
    # decisions come before even steps: step=4.ckpt is saved after step 3, before its losses
    # (which the decision before step 4 reads) reach callback_metrics
    marker = tmp_path / "run" / "checkpoints" / "epoch=0-step=4.ckpt"
    deadline = time.monotonic() + 300
    while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    last = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)
    assert 4 <= last["global_step"] < 10
    finish(midtrain("fit", "--config", str(run), "--ckpt_path", "last"))
    a = torch.load(tmp_path / "ref" / "checkpoints" / "last.ckpt", weights_only=True)
    b = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)
    assert b["global_step"] == 10
    assert a["callbacks"]["AdaptiveMixture"]["history"]
    assert a["callbacks"]["AdaptiveMixture"] == b["callbacks"]["AdaptiveMixture"]
    assert a["MixtureDataModule"]["runtime_phases"] == b["MixtureDataModule"]["runtime_phases"]
    for k in a["state_dict"]:
        assert torch.equal(a["state_dict"][k], b["state_dict"][k]), k


# -- bad input -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"rule": "greedy"}, r"AdaptiveMixture.rule: must be one of excess_loss, thompson"),
        ({"rule": "thompson", "every_n_steps": 0}, r"AdaptiveMixture.every_n_steps: must be"),
        ({"rule": "thompson", "floor": 0.5, "ceiling": 0.4}, r"AdaptiveMixture.floor: 0.5 is abo"),
        ({"rule": "thompson", "floor": {"code": 1.5}}, r"AdaptiveMixture.floor.code: must be"),
        ({"rule": "excess_loss"}, r"AdaptiveMixture.reference: rule excess_loss needs"),
        ({"rule": "thompson", "step_size": 0}, r"AdaptiveMixture.step_size: must be > 0"),
        ({"rule": "thompson", "smoothing": 1.0}, r"AdaptiveMixture.smoothing: must be below 1"),
        ({"rule": "excess_loss", "reference": "nope.json"}, r"reference: cannot read nope.json"),
    ],
)
def test_bad_settings_are_refused_in_one_line(kwargs: dict, match: str) -> None:
    with pytest.raises(MidtrainError, match=match) as err:
        AdaptiveMixture(**kwargs)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"floor": {"poetry": 0.1}}, r"AdaptiveMixture.floor: unknown domain 'poetry'; known"),
        ({"ceiling": {"poetry": 0.1}}, r"AdaptiveMixture.ceiling: unknown domain 'poetry'"),
        ({"floor": {"code": 0.6, "math": 0.5}}, r"AdaptiveMixture.floor: the floors of .* > 1"),
        ({"ceiling": 0.3}, r"AdaptiveMixture.ceiling: the ceilings of .* sum to 0.9 < 1"),
        ({"floor": {"code": 0.5}, "ceiling": {"code": 0.4}}, r"floor.code: 0.5 is above its"),
        ({"every_n_steps": 3}, r"every_n_steps: 3 is not a multiple of .*log_every_n_steps=2"),
        ({"start_step": 6}, r"AdaptiveMixture.start_step: 6 is not before trainer.max_steps=6"),
        (
            {"rule": "excess_loss", "reference": {"prose": 1.0, "poetry": 1.0}},
            r"AdaptiveMixture.reference: unknown domain 'poetry'",
        ),
        (
            {"rule": "excess_loss", "reference": {"prose": 1.0}},
            r"AdaptiveMixture.reference: no reference loss for domain 'code'",
        ),
    ],
)
def test_bad_settings_for_the_data_are_refused_before_writing(
    builtin_store: Path, tmp_path: Path, capsys: pytest.CaptureFixture, kwargs: dict, match: str
) -> None:
    cfg = fit_config(tmp_path, builtin_store, "bad", max_steps=6, log_every_n_steps=2)
    raw = yaml.safe_load(cfg.read_text())
    raw["data"]["init_args"]["weights"] = START
    raw["trainer"]["callbacks"] = [
        {
            "class_path": "midtrain.callbacks.AdaptiveMixture",
            "init_args": {"rule": "thompson", "every_n_steps": 2, **kwargs},
        }
    ]
    cfg.write_text(yaml.safe_dump(raw))
    capsys.readouterr()
    assert main(["fit", "--config", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if "error:" in line]
    assert len(lines) == 1 and re.search(match, lines[0]), err
    assert not (tmp_path / "bad").exists()


def test_reference_from_a_runs_summary(tmp_path: Path) -> None:
    summary = {"metrics": {"train/loss": 2.0, "train/loss/code": 1.5, "val/code/loss": 9.0}}
    (tmp_path / "summary.json").write_text(json.dumps(summary))
    assert AdaptiveMixture("excess_loss", reference=str(tmp_path)).reference == {"code": 1.5}
    (tmp_path / "ref.yaml").write_text("code: 1.25\nprose: 2\n")
    ref = AdaptiveMixture("excess_loss", reference=str(tmp_path / "ref.yaml")).reference
    assert ref == {"code": 1.25, "prose": 2.0}


def test_adapted_domains_are_those_drawn_plus_named_floors(builtin_store: Path) -> None:
    dm = MixtureDataModule(str(builtin_store), weights={"prose": 1.0, "code": 0.0}, seq_len=16)
    assert AdaptiveMixture("thompson", floor=0.1).adapted_domains(dm) == ["prose"]
    named = AdaptiveMixture("thompson", floor={"math": 0.1, "code": 0.0})
    assert named.adapted_domains(dm) == ["prose", "math"]
