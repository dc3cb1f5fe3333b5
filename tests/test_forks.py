"""Fork options and the anneal schedule: ``--fork_optimizer keep|reset``, ``--fork_data
keep|fresh``, ``model.lr_schedule: anneal`` (from the checkpoint's LR) with and without
``model.rewarm``, and exact resume of such a branch."""

from __future__ import annotations

import math
import os
import re
import signal
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import pytest
import torch

from midtrain import CausalLM, MixtureDataModule
from midtrain.cli import main
from midtrain.data.mixture import MixtureSchedule, Phase, block_indices, domain_key
from midtrain.errors import MidtrainError
from midtrain.train.callbacks.checkpoints import ModelCheckpoint
from midtrain.train.callbacks.mixture import MixtureSwitch
from midtrain.train.optim import lr_at
from midtrain.train.trainer import Trainer
from tests.helpers import SaveBatches, fit_or_fork
from tests.test_training import fit_config, scalars, weights

TINY = {"n_layer": 1, "n_embd": 32, "n_head": 2, "block_size": 64}
SEQ, MICRO, LR, MIN_LR = 16, 3, 1e-3, 1e-5


class RecordLR(pl.Callback):
    """The learning rate of every optimizer step's update, and the state the fit started from."""

    def __init__(self) -> None:
        self.lrs: dict[int, float] = {}
        self.start_state: dict[int, Any] = {}
        self.start_weights: dict[str, torch.Tensor] = {}

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        opt = trainer.optimizers[0]
        params = [p for group in opt.param_groups for p in group["params"]]  # state_dict's ids
        self.start_state = {
            i: {k: v.clone() for k, v in opt.state[p].items()}
            for i, p in enumerate(params)
            if p in opt.state
        }
        self.start_weights = {k: v.clone() for k, v in pl_module.state_dict().items()}

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self.lrs[trainer.global_step] = trainer.optimizers[0].param_groups[0]["lr"]


def run(
    store: Path,
    root: Path,
    callbacks: list,
    max_steps: int,
    ckpt_path: str | None = None,
    fork_step: int | None = None,
    fork_data: str = "keep",
    fork_optimizer: str = "keep",
    weights: dict | None = None,
    **model_kwargs: Any,
) -> tuple[CausalLM, MixtureDataModule]:
    dm = MixtureDataModule(
        str(store), weights=weights or {"prose": 1.0, "code": 1.0}, seq_len=SEQ,
        micro_batch_size=MICRO, val_max_blocks=2,
    )  # fmt: skip
    torch.manual_seed(0)
    kwargs = {"lr": LR, "min_lr": MIN_LR, "warmup": 2, **model_kwargs}
    model = CausalLM(arch="tiny", model_config=TINY, vocab_size=dm.vocab_size, **kwargs)
    trainer = Trainer(
        accelerator="cpu", devices=1, max_steps=max_steps, default_root_dir=str(root),
        logger=False, enable_progress_bar=False, enable_model_summary=False,
        limit_val_batches=0, num_sanity_val_steps=0,
        callbacks=[
            ModelCheckpoint(dirpath=str(root / "checkpoints"), save_last=True, save_top_k=-1,
                            every_n_train_steps=2),
            *callbacks,
        ],
    )  # fmt: skip
    fit_or_fork(trainer, model, dm, ckpt_path, fork_step, fork_optimizer, fork_data)
    return model, dm


@pytest.fixture(scope="module")
def parent(builtin_store: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A cosine run of 8 steps (prose and code) with a checkpoint every 2 steps."""
    root = tmp_path_factory.mktemp("parent")
    rec = RecordLR()
    run(builtin_store, root, [rec], max_steps=8)
    point = root / "checkpoints" / "epoch=0-step=4.ckpt"
    return {"point": str(point), "lrs": rec.lrs, "ckpt": torch.load(point, weights_only=False)}


# -- the anneal schedule, as a pure function ------------------------------------------------------


def test_anneal_starts_at_the_checkpoint_lr_and_ends_at_min_lr() -> None:
    kw = {"lr": 1.0, "min_lr": 0.01, "max_steps": 20, "origin": 10, "start_lr": 0.37}
    lrs = [lr_at(s, warmup=0, schedule="anneal", **kw) for s in range(10, 20)]
    assert lrs[0] == 0.37 and lrs[-1] == pytest.approx(0.01, rel=1e-12)
    assert np.allclose(np.diff(lrs), (0.01 - 0.37) / 9)  # linear
    # re-warm over 4 steps from the fork step to the checkpoint's LR, then the linear decay
    warm = [lr_at(s, warmup=4, schedule="anneal", **kw) for s in range(10, 20)]
    assert warm[:4] == pytest.approx([0.37 * (k + 1) / 4 for k in range(4)], rel=1e-12)
    assert warm[4] == pytest.approx(0.37) and warm[-1] == pytest.approx(0.01)
    assert np.allclose(np.diff(warm[4:]), (0.01 - 0.37) / 5)
    # WSD's shape from the fork: hold, then decay over the last half of the 10 steps
    wsd = [
        lr_at(s, warmup=0, schedule="anneal_wsd", decay_fraction=0.5, **kw) for s in range(10, 20)
    ]
    assert wsd[:5] == [0.37] * 5 and wsd[-1] == pytest.approx(0.01)
    with pytest.raises(MidtrainError, match="model.lr_schedule: anneal starts at the learning"):
        lr_at(0, lr=1.0, min_lr=0.1, warmup=0, max_steps=5, schedule="anneal")


# -- anneal and re-warm from a fork ---------------------------------------------------------------


def test_anneal_from_a_fork(builtin_store: Path, tmp_path: Path, parent: dict) -> None:
    saved_lr = parent["ckpt"]["optimizer_states"][0]["param_groups"][0]["lr"]
    assert saved_lr == pytest.approx(parent["lrs"][4], rel=1e-12)  # what the parent ran at step 4
    rec = RecordLR()
    run(builtin_store, tmp_path / "a", [rec], 12, parent["point"], 4, lr_schedule="anneal")
    assert sorted(rec.lrs) == list(range(4, 12))
    assert math.isclose(rec.lrs[4], saved_lr, rel_tol=1e-9)
    assert math.isclose(rec.lrs[11], MIN_LR, rel_tol=1e-9)
    assert np.allclose(np.diff([rec.lrs[s] for s in range(4, 12)]), (MIN_LR - saved_lr) / 7)
    # re-warm: from the fork step over warmup steps to the checkpoint's LR, then the decay
    rec = RecordLR()
    run(
        builtin_store, tmp_path / "w", [rec], 12, parent["point"], 4,
        lr_schedule="anneal", rewarm=True, warmup=3,
    )  # fmt: skip
    lrs = [rec.lrs[s] for s in range(4, 12)]
    assert lrs[:3] == pytest.approx([saved_lr * (k + 1) / 3 for k in range(3)], rel=1e-9)
    assert lrs[3] == pytest.approx(saved_lr, rel=1e-9)
    assert lrs[-1] == pytest.approx(MIN_LR, rel=1e-9)
    ckpt = torch.load(tmp_path / "w" / "checkpoints" / "last.ckpt", weights_only=False)
    assert ckpt["midtrain"]["anneal"] == {"step": 4, "lr": saved_lr}


def test_anneal_and_rewarm_misuse_is_one_line(builtin_store: Path, tmp_path: Path) -> None:
    with pytest.raises(MidtrainError, match="model.lr_schedule: anneal starts at the learning"):
        run(builtin_store, tmp_path / "new", [], 4, lr_schedule="anneal")
    with pytest.raises(MidtrainError, match="model.rewarm: re-warms an anneal"):
        CausalLM(arch="tiny", model_config=TINY, rewarm=True)


# -- --fork_optimizer ------------------------------------------------------------------------------


def test_optimizer_reset_starts_adamw_afresh_with_the_same_weights(
    builtin_store: Path, tmp_path: Path, parent: dict
) -> None:
    saved = parent["ckpt"]
    branches = {}
    for mode in ("keep", "reset"):
        rec = RecordLR()
        run(builtin_store, tmp_path / mode, [rec], 6, parent["point"], 4, fork_optimizer=mode)
        branches[mode] = rec
        # the weights of the checkpoint either way
        assert all(torch.equal(v, saved["state_dict"][k]) for k, v in rec.start_weights.items())
        last = torch.load(tmp_path / mode / "checkpoints" / "last.ckpt", weights_only=False)
        assert last["midtrain"]["run"]["fork"] == {"step": 4, "optimizer": mode, "data": "keep"}
    # keep: the checkpoint's AdamW moments and step count; reset: none (a new optimizer's)
    keep = branches["keep"].start_state
    assert len(keep) == len(saved["optimizer_states"][0]["state"]) > 0
    for i, state in saved["optimizer_states"][0]["state"].items():
        assert all(torch.equal(keep[i][k], v) for k, v in state.items())
    assert branches["reset"].start_state == {}
    # same schedule: the same learning rates; different moments: different weights
    assert branches["keep"].lrs == branches["reset"].lrs
    a, b = (
        weights(tmp_path / "keep" / "checkpoints" / "last.ckpt"),
        weights(tmp_path / "reset" / "checkpoints" / "last.ckpt"),
    )
    assert not all(torch.equal(a[k], b[k]) for k in a)


# -- --fork_data ------------------------------------------------------------------------------------


def expected_batch(dm: MixtureDataModule, schedule: MixtureSchedule, k: int) -> torch.Tensor:
    """Tokens (seq_len + 1 per row) of step k of ``schedule``, from the pure functions."""
    domain, draw = schedule.step(k)
    rows = []
    for d, n in zip(domain.tolist(), draw.tolist(), strict=True):
        name = schedule.domains[d]
        split = dm.store.domain(name).train
        block = block_indices(np.array([n]), split.num_blocks(SEQ), dm.seed, domain_key(name))
        lo = int(block[0]) * SEQ
        rows.append(torch.from_numpy(np.asarray(split.read(lo, lo + SEQ + 1)[0], dtype=np.int64)))
    return torch.stack(rows)


def test_fresh_data_feeds_the_first_samples_of_the_new_schedule(
    builtin_store: Path, tmp_path: Path, parent: dict
) -> None:
    switch = {"code": 1.0, "math": 1.0}
    fed = {}
    for mode in ("fresh", "keep"):
        save = SaveBatches(str(tmp_path / f"{mode}.pt"))
        _, dm = run(
            builtin_store, tmp_path / mode, [save, MixtureSwitch(switch, step=4)], 7,
            parent["point"], 4, fork_data=mode,
        )  # fmt: skip
        fed[mode] = [torch.cat([b["input_ids"], b["targets"][:, -1:]], 1) for b in save.batches]
    # fresh: branch step 4 + k is step k of a new run whose schedule is the branch's from 4 on
    new = MixtureSchedule(dm.domains, [Phase(0, switch)], MICRO, dm.seed)
    for k in range(3):
        assert torch.equal(fed["fresh"][k], expected_batch(dm, new, k))
    # keep continues the checkpoint's stream: code is read on from where the parent stopped
    assert not torch.equal(fed["keep"][0], fed["fresh"][0])
    ckpt = torch.load(tmp_path / "fresh" / "checkpoints" / "last.ckpt", weights_only=False)
    assert ckpt["midtrain"]["run"]["fork"]["data"] == "fresh"
    assert ckpt["MixtureDataModule"]["origin"] == 4


def test_fresh_data_refuses_a_ramp_across_the_fork_step(
    builtin_store: Path, tmp_path: Path, parent: dict
) -> None:
    ramp = MixtureSwitch({"math": 1.0}, step=4, ramp_steps=2)  # from the old mixture
    with pytest.raises(MidtrainError, match="fork_data: fresh .* ramps across it"):
        run(builtin_store, tmp_path / "r", [ramp], 8, parent["point"], 4, fork_data="fresh")


# -- a branch resumes exactly -------------------------------------------------------------------


def test_a_fresh_reset_anneal_branch_resumes_bitwise(
    builtin_store: Path, tmp_path: Path, parent: dict
) -> None:
    branch = [MixtureSwitch({"code": 1.0, "math": 1.0}, step=4)]
    options = {"fork_data": "fresh", "fork_optimizer": "reset", "lr_schedule": "anneal"}
    run(builtin_store, tmp_path / "b", branch, 8, parent["point"], 4, **options)
    mid = str(tmp_path / "b" / "checkpoints" / "epoch=0-step=6.ckpt")
    switch = [MixtureSwitch({"code": 1.0, "math": 1.0}, step=4)]
    run(builtin_store, tmp_path / "r", switch, 8, mid, lr_schedule="anneal")  # a plain resume
    a = weights(tmp_path / "b" / "checkpoints" / "last.ckpt")
    b = weights(tmp_path / "r" / "checkpoints" / "last.ckpt")
    assert all(torch.equal(a[k], b[k]) for k in a)
    resumed = torch.load(tmp_path / "r" / "checkpoints" / "last.ckpt", weights_only=False)
    assert resumed["midtrain"]["run"]["fork"] == {"step": 4, "optimizer": "reset", "data": "fresh"}


# -- the command line -------------------------------------------------------------------------------


def one_line_error(capsys: pytest.CaptureFixture, args: list[str], message: str) -> None:
    capsys.readouterr()
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert re.search(message, err[0]), err[0]


def test_fork_options_without_a_fork_are_one_line(
    builtin_store: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    cfg = fit_config(tmp_path, builtin_store, "x", max_steps=4, limit_val_batches=0)
    fit = ["fit", "--config", str(cfg)]
    one_line_error(
        capsys, [*fit, "--fork_data", "fresh"], "fork_data: fresh is an option of a fork"
    )
    one_line_error(
        capsys, [*fit, "--fork_optimizer", "reset"], "fork_optimizer: reset is an option of a fork"
    )
    one_line_error(
        capsys, [*fit, "--model.lr_schedule", "anneal"], "model.lr_schedule: anneal starts at the"
    )
    one_line_error(capsys, [*fit, "--fork_data", "later"], "fork_data")
    assert not (tmp_path / "x").exists()  # nothing written


@pytest.mark.slow
def test_fork_options_from_the_command_line(
    builtin_store: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    cfg = fit_config(tmp_path, builtin_store, "p", max_steps=4, limit_val_batches=0)
    assert main(["fit", "--config", str(cfg), "--checkpoint.every_n_train_steps", "2"]) == 0
    point = str(tmp_path / "p" / "checkpoints" / "last.ckpt")
    saved_lr = torch.load(point, weights_only=False)["optimizer_states"][0]["param_groups"][0]
    branch = fit_config(tmp_path, builtin_store, "b", max_steps=8, limit_val_batches=0)
    args = ["fit", "--config", str(branch), "--model.lr_schedule", "anneal"]
    args += ["--fork_optimizer", "reset", "--fork_data", "fresh", "--fork", point]
    assert main([*args, "--checkpoint.every_n_train_steps", "2"]) == 0
    lrs = dict(scalars(tmp_path / "b")["train/lr"])
    assert min(lrs) == 4 and math.isclose(lrs[4], saved_lr["lr"], rel_tol=1e-6)  # float32 events
    last = torch.load(tmp_path / "b" / "checkpoints" / "last.ckpt", weights_only=False)
    assert last["midtrain"]["run"]["fork"] == {"step": 4, "optimizer": "reset", "data": "fresh"}
    # the branch's own config (with its fork options) resumes it as it was started
    saved = str(tmp_path / "b" / "config.yaml")
    again = ["fit", "--config", saved, "--fork", "null", "--ckpt_path", "last"]
    assert main(again) == 0
    # a resume that restates another fork is refused
    one_line_error(
        capsys,
        [*again, "--fork_data", "keep"],
        "fork_data: keep, but --ckpt_path .* continues a run forked with fork_data fresh",
    )


@pytest.mark.slow
def test_a_branch_resumes_bitwise_after_sigkill(builtin_store: Path, tmp_path: Path) -> None:
    from tests.test_kill_resume import MAX_STEPS, config, finish, midtrain

    parent = config(tmp_path, builtin_store, "parent", 0, 1, 1, 0.0)
    finish(midtrain("fit", "--config", str(parent)))
    point = tmp_path / "parent" / "checkpoints" / "epoch=0-step=6.ckpt"  # after its switch
    branch = ["--fork", str(point), "--fork_data", "fresh", "--fork_optimizer", "reset"]
    branch += ["--model.lr_schedule", "anneal"]
    branch += ["--trainer.callbacks+=midtrain.callbacks.MixtureSwitch"]
    branch += ["--trainer.callbacks.step=7", "--trainer.callbacks.weights={code: 1}"]
    ref = config(tmp_path, builtin_store, "ref", 0, 1, 1, 0.0)
    finish(midtrain("fit", "--config", str(ref), *branch))
    cfg = config(tmp_path, builtin_store, "run", 0, 1, 1, 0.3)
    proc = midtrain("fit", "--config", str(cfg), *branch)
    marker = tmp_path / "run" / "checkpoints" / "epoch=0-step=8.ckpt"
    deadline = time.monotonic() + 300
    while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    time.sleep(0.1)  # let the write finish; the run now sleeps after its batch
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the branch ended before it could be killed"
    saved = str(tmp_path / "run" / "config.yaml")  # holds --fork and its options
    finish(midtrain("fit", "--config", saved, "--fork", "null", "--ckpt_path", "last"))
    a = torch.load(tmp_path / "ref" / "checkpoints" / "last.ckpt", weights_only=False)
    b = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=False)
    assert a["global_step"] == b["global_step"] == MAX_STEPS
    assert b["midtrain"]["run"]["fork"] == {"step": 6, "optimizer": "reset", "data": "fresh"}
    for k in a["state_dict"]:
        assert torch.equal(a["state_dict"][k], b["state_dict"][k]), k
