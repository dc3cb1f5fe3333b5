"""Run state in one home (midtrain.checkpoint.plan): the rules each part declares, applied per
command, and what follows from them without the planner knowing a part's settings."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from midtrain import CausalLM, MixtureDataModule
from midtrain.callbacks import MixtureSwitch, ModelCheckpoint
from midtrain.checkpoint.plan import Fork, Rule, RunPlan, Setting, check_record
from midtrain.cli import main
from midtrain.errors import MidtrainError
from midtrain.train.callbacks.summary import losses_line
from midtrain.train.optim import adamw_settings, lr_at
from midtrain.train.trainer import Trainer
from tests.test_averaging import config as ema_config
from tests.test_training import scalars

TINY = {"n_layer": 1, "n_embd": 32, "n_head": 2, "block_size": 64}


# -- the rules, on records ------------------------------------------------------------------------

NOW = {
    "model.shape": Setting({"n_layer": 1}, Rule.PAST, weights=True),
    "model.lr": Setting(1e-3),
    "data.schedule": Setting([(0, {"a": 1.0}), (4, {"b": 1.0})], Rule.SCHEDULE),
    "data.micro_batch_size": Setting(4, Rule.ELASTIC),
    "fork": Setting({"step": 2}, Rule.RECORD),
}
SAVED = {k: s.value for k, s in NOW.items()} | {"parts": {}}


def refusal(saved: dict[str, Any], plan: RunPlan) -> str | None:
    try:
        check_record(plan, saved, NOW)
    except MidtrainError as e:
        assert "\n" not in str(e)
        return str(e)
    return None


RESUME = RunPlan("fit", "last.ckpt")
FORK = RunPlan("fit", "x.ckpt", Fork(step=4))


@pytest.mark.parametrize(
    "changed,resume,fork",
    [
        ({}, None, None),
        ({"model.lr": 3e-3}, "model.lr 0.003 -> 0.001", None),  # a fork may change it
        ({"model.shape": {"n_layer": 2}}, "model.shape.n_layer 2 -> 1", "model.shape.n_layer"),
        ({"data.micro_batch_size": 8}, None, None),  # elastic
        ({"fork": None}, None, None),  # a record, restated only by --fork_* options
        # a switch after the fork step: a fork may change it, a resume not
        ({"data.schedule": [(0, {"a": 1.0}), (5, {"b": 1.0})]}, "different mixture", None),
        ({"data.schedule": [(0, {"a": 1.0})]}, "different mixture", None),
        ({"data.schedule": [(0, {"b": 1.0})]}, "different mixture", "before the fork point"),
    ],
)
def test_each_rule_for_a_resume_and_a_fork(
    changed: dict[str, Any], resume: str | None, fork: str | None
) -> None:
    saved = SAVED | changed
    for plan, expected in ((RESUME, resume), (FORK, fork)):
        said = refusal(saved, plan)
        assert (said is None) == (expected is None), (plan.mode, said)
        if expected is not None:
            assert expected in str(said)


def test_a_callback_whose_state_the_checkpoint_holds_cannot_be_dropped_on_resume() -> None:
    saved = SAVED | {"EMA.decay": 0.9, "parts": {"EMA": "midtrain.callbacks.EMA"}}
    said = refusal(saved, RESUME)
    assert said is not None and "this run has no midtrain.callbacks.EMA" in said
    assert refusal(saved, FORK) is None  # a branch may drop it


def test_a_fork_option_is_checked_once() -> None:
    with pytest.raises(MidtrainError, match="fork_optimizer: 'later'"):
        Fork(step=1, optimizer="later")


# -- the parts' own declarations ------------------------------------------------------------------


class AmsgradLM(CausalLM):
    """A model with one more AdamW option, added the way a contributor would: an argument and
    its use where the optimizer is built. Nothing in midtrain.checkpoint.plan knows of it."""

    def __init__(self, amsgrad: bool = False, **kwargs: Any) -> None:
        super().__init__(**kwargs)

    def configure_optimizers(self) -> Any:
        config = super().configure_optimizers()
        for group in config["optimizer"].param_groups:
            group["amsgrad"] = self.hparams.amsgrad
        return config


def fit(store: Path, root: Path, model: CausalLM, max_steps: int, ckpt: str | None = None) -> None:
    dm = MixtureDataModule(str(store), seq_len=16, micro_batch_size=2, val_max_blocks=2)
    trainer = Trainer(
        accelerator="cpu", max_steps=max_steps, default_root_dir=str(root), logger=False,
        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
        num_sanity_val_steps=0,
        callbacks=[ModelCheckpoint(dirpath=str(root / "checkpoints"), save_last=True)],
    )  # fmt: skip
    trainer.fit(model, dm, ckpt_path=ckpt)


def test_a_new_optimizer_setting_is_refused_on_a_changed_resume(
    builtin_store: Path, tmp_path: Path
) -> None:
    def model(amsgrad: bool) -> AmsgradLM:
        return AmsgradLM(amsgrad=amsgrad, arch="tiny", model_config=TINY, vocab_size=8192)

    fit(builtin_store, tmp_path / "a", model(False), max_steps=2)
    last = str(tmp_path / "a" / "checkpoints" / "last.ckpt")
    assert torch.load(last, weights_only=False)["midtrain"]["run"]["model.amsgrad"] is False
    with pytest.raises(MidtrainError, match=r"model\.amsgrad False -> True; resume with"):
        fit(builtin_store, tmp_path / "a", model(True), max_steps=2, ckpt=last)
    fit(builtin_store, tmp_path / "a", model(False), max_steps=2, ckpt=last)  # the same: fine


def test_validate_reads_a_midtraining_run_without_its_schedule(
    builtin_store: Path, tmp_path: Path
) -> None:
    """What the planner asks of an evaluation: the weights' shape, never the schedule."""
    dm = MixtureDataModule(str(builtin_store), seq_len=16, micro_batch_size=2, val_max_blocks=2)
    model = CausalLM(arch="tiny", model_config=TINY, vocab_size=dm.vocab_size)
    trainer = Trainer(
        accelerator="cpu", max_steps=4, default_root_dir=str(tmp_path), logger=False,
        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
        num_sanity_val_steps=0, callbacks=[MixtureSwitch({"code": 1.0}, step=2)],
    )  # fmt: skip
    trainer.fit(model, dm)
    ckpt = next((tmp_path / "checkpoints").glob("*.ckpt"))
    fresh = MixtureDataModule(str(builtin_store), seq_len=16, micro_batch_size=2, val_max_blocks=2)
    other = Trainer(accelerator="cpu", logger=False, enable_progress_bar=False)
    results = other.validate(CausalLM(arch="tiny", model_config=TINY), fresh, ckpt_path=ckpt)
    assert results and all(k.startswith("val/") for k in results[0])
    bigger = CausalLM(arch="tiny", model_config={**TINY, "n_layer": 2})
    with pytest.raises(MidtrainError, match=r"model.shape.n_layer 1 -> 2\); evaluate it"):
        other.validate(bigger, fresh, ckpt_path=ckpt)


def test_adamw_settings_are_read_in_one_place() -> None:
    hp = {"lr": 1e-3, "betas": [0.9, 0.95], "eps": 1e-8, "weight_decay": 0.1}
    assert adamw_settings(hp) == {**hp, "betas": (0.9, 0.95)}


def test_schedule_offset_continues_a_schedule_and_refuses_what_it_cannot() -> None:
    kwargs: dict[str, Any] = {"lr": 1.0, "min_lr": 0.0, "warmup": 0, "schedule": "cosine"}
    whole = [lr_at(s, max_steps=10, **kwargs) for s in range(10)]
    tail = [lr_at(s, max_steps=6, offset=4, **kwargs) for s in range(6)]
    assert tail == whole[4:]
    for offset, schedule, said in ((-1, "cosine", "int >= 0"), (3, "anneal", "no schedule")):
        with pytest.raises(MidtrainError, match=f"model.schedule_offset: .*{said}"):
            CausalLM(arch="tiny", model_config=TINY, schedule_offset=offset, lr_schedule=schedule)


# -- the command line: an EMA run, its TensorBoard files, what its evaluation writes ---------------


@pytest.fixture(scope="module")
def ema_cli_run(tmp_path_factory: pytest.TempPathFactory, builtin_store: Path) -> Path:
    """A 4-step run with EMA (validated at steps 2 and 4), from the command line."""
    tmp = tmp_path_factory.mktemp("ema-cli")
    assert main(["fit", "--config", str(ema_config(tmp, builtin_store, "run", max_steps=4))]) == 0
    return tmp / "run"


def test_tensorboard_opens_on_charts_that_mean_something(
    ema_cli_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    tags = scalars(ema_cli_run)
    assert "epoch" not in tags and "hp_metric" not in tags
    assert {"train/loss", "val/prose/loss", "val_ema/prose/loss"} <= set(tags)
    # validate logs at the checkpoint's optimizer step, into <run>/validate only
    ckpt = ema_cli_run / "checkpoints" / "epoch=0-step=2.ckpt"
    assert (
        main(["validate", "--config", str(ema_cli_run / "config.yaml"), "--ckpt_path", str(ckpt)])
        == 0
    )
    evaluated = scalars(ema_cli_run / "validate")
    assert "epoch" not in evaluated and "hp_metric" not in evaluated
    assert [step for step, _ in evaluated["val/prose/loss"]] == [2]
    # the summary names the averaged weights' losses too
    assert "val_ema/prose/loss" in json.loads((ema_cli_run / "summary.json").read_text())["metrics"]
    assert "val_ema/prose/loss" in losses_line({"val_ema/prose/loss": 1.0}, "val")


def test_init_from_reads_the_averaged_weights_with_weights_ema(
    ema_cli_run: Path, builtin_store: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    last = ema_cli_run / "checkpoints" / "last.ckpt"
    cfg = ema_config(tmp_path, builtin_store, "child", max_steps=1, limit_val_batches=0)
    common = ["fit", "--config", str(cfg), "--model.init_from", str(last)]
    common += ["--model.lr_schedule", "constant", "--model.lr", "1e-12"]  # weights barely move
    assert main([*common, "--weights", "ema"]) == 0
    child = torch.load(tmp_path / "child" / "checkpoints" / "last.ckpt", weights_only=True)
    average = torch.load(last, weights_only=True)["ema"]["state_dict"]
    for name, value in average.items():
        torch.testing.assert_close(child["state_dict"][name], value, rtol=0, atol=1e-9)
    # a checkpoint without an average is one line, before anything is written
    plain = tmp_path / "plain.ckpt"
    saved = torch.load(last, weights_only=False)
    del saved["ema"]
    torch.save(saved, plain)
    capsys.readouterr()
    other = ema_config(tmp_path, builtin_store, "other", max_steps=1)
    args = ["fit", "--config", str(other), "--model.init_from", str(plain), "--weights", "ema"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "has no averaged weights" in err[0], err
    assert not (tmp_path / "other").exists()
