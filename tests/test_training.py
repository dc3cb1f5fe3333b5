"""Training through the `midtrain` command: TensorBoard tags, resume, validate, schedules."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from midtrain.cli import main
from midtrain.train.optim import lr_at


def fit_config(tmp_path: Path, store: Path, run: str, **trainer: object) -> Path:
    cfg = {
        "seed_everything": 0,
        "model": {
            "arch": "tiny",
            "model_config": {"n_layer": 2, "n_embd": 64, "n_head": 4, "block_size": 64},
            "lr": 3e-3,
            "warmup": 2,
        },
        "data": {
            "class_path": "midtrain.MixtureDataModule",
            "init_args": {
                "store": str(store),
                "seq_len": 32,
                "micro_batch_size": 4,
                "val_max_blocks": 4,
            },
        },
        "trainer": {
            "accelerator": "cpu",
            "devices": 1,
            "max_steps": 10,
            "log_every_n_steps": 1,
            "default_root_dir": str(tmp_path / run),
            "enable_progress_bar": False,
            "num_sanity_val_steps": 0,
            "enable_model_summary": False,
            **trainer,
        },
    }
    path = tmp_path / f"{run}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    ea = EventAccumulator(str(run_dir))
    ea.Reload()
    return {t: [(e.step, e.value) for e in ea.Scalars(t)] for t in ea.Tags()["scalars"]}


def weights(ckpt: Path) -> dict[str, torch.Tensor]:
    return torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]


def test_fit_logs_tags_and_resume_is_exact(tmp_path: Path, builtin_store: Path) -> None:
    full = fit_config(tmp_path, builtin_store, "full", val_check_interval=5)
    assert (
        main(
            [
                "fit",
                "--config",
                str(full),
                "--checkpoint.every_n_train_steps",
                "3",
                "--checkpoint.save_top_k",
                "-1",
            ]
        )
        == 0
    )
    tags = scalars(tmp_path / "full")
    for tag in [
        "train/loss",
        "train/lr",
        "train/grad_norm",
        "train/tokens",
        "val/prose/loss",
        "val/math/ppl",
        *(f"train/{k}/{d}" for k in ("loss", "tokens") for d in ("prose", "code", "math")),
    ]:
        assert tag in tags, tag
    assert not any("dataloader_idx" in t for t in tags)
    assert [s for s, _ in tags["train/loss"]] == list(range(10))  # one point per optimizer step
    assert tags["train/tokens"][-1][1] == 10 * 4 * 32
    assert sum(tags[f"train/tokens/{d}"][-1][1] for d in ("prose", "code", "math")) == 10 * 4 * 32
    hparams = yaml.safe_load((tmp_path / "full" / "hparams.yaml").read_text())
    assert hparams["arch"] == "tiny" and hparams["betas"] == [0.9, 0.95]

    # Resume from the step-6 checkpoint of the same run (in a fresh run directory) and train
    # to 10: the same weights, bit for bit, as the uninterrupted run.
    step6 = tmp_path / "full" / "checkpoints" / "epoch=0-step=6.ckpt"
    assert step6.is_file()
    part = fit_config(tmp_path, builtin_store, "part", val_check_interval=5)
    assert main(["fit", "--config", str(part), "--ckpt_path", str(step6)]) == 0
    # the final step is checkpointed even when every_n_train_steps does not divide max_steps
    assert (
        torch.load(tmp_path / "full" / "checkpoints" / "last.ckpt", weights_only=True)[
            "global_step"
        ]
        == 10
    )
    resumed = weights(tmp_path / "part" / "checkpoints" / "last.ckpt")
    reference = weights(tmp_path / "full" / "checkpoints" / "last.ckpt")
    assert resumed.keys() == reference.keys()
    for k in reference:
        assert torch.equal(resumed[k], reference[k]), k
    lr_full = dict(scalars(tmp_path / "full")["train/lr"])
    lr_part = dict(scalars(tmp_path / "part")["train/lr"])
    assert all(lr_part[s] == pytest.approx(lr_full[s]) for s in range(6, 10))


def test_gradient_accumulation_logs_once_per_step(tmp_path: Path, builtin_store: Path) -> None:
    cfg = fit_config(
        tmp_path, builtin_store, "acc", max_steps=3, accumulate_grad_batches=2, limit_val_batches=0
    )
    assert main(["fit", "--config", str(cfg)]) == 0
    tags = scalars(tmp_path / "acc")
    assert [s for s, _ in tags["train/loss"]] == [0, 1, 2]
    assert tags["train/tokens"][-1][1] == 3 * 2 * 4 * 32


def test_validate_reports_every_set(
    tmp_path: Path, builtin_store: Path, capsys: pytest.CaptureFixture
) -> None:
    cfg = fit_config(tmp_path, builtin_store, "v", max_steps=2, limit_val_batches=0)
    assert main(["fit", "--config", str(cfg)]) == 0
    capsys.readouterr()
    ckpt = tmp_path / "v" / "checkpoints" / "last.ckpt"
    assert main(["validate", "--config", str(cfg), "--ckpt_path", str(ckpt)]) == 0
    out = capsys.readouterr().out.splitlines()
    # one table: a column per validation set, a row per metric
    header = out.index(next(line for line in out if line.split() == ["prose", "code", "math"]))
    assert out[header + 1].startswith("val/loss")


def test_limit_val_batches_integer_stays_integer(
    tmp_path: Path, builtin_store: Path, capsys: pytest.CaptureFixture
) -> None:
    cfg = fit_config(tmp_path, builtin_store, "p", limit_val_batches=1)
    with pytest.raises(SystemExit):
        main(
            [
                "fit",
                "--config",
                str(cfg),
                "--trainer.limit_train_batches",
                "3",
                "--trainer.val_check_interval",
                "0.5",
                "--print_config",
            ]
        )
    printed = yaml.safe_load(capsys.readouterr().out)["trainer"]
    assert printed["limit_val_batches"] == 1 and isinstance(printed["limit_val_batches"], int)
    assert printed["limit_train_batches"] == 3 and isinstance(printed["limit_train_batches"], int)
    assert printed["val_check_interval"] == 0.5


def test_lr_schedules() -> None:
    kw = dict(lr=1.0, min_lr=0.1, warmup=10, max_steps=110)
    assert lr_at(0, schedule="cosine", **kw) == pytest.approx(0.1)
    assert lr_at(9, schedule="cosine", **kw) == pytest.approx(1.0)
    assert lr_at(60, schedule="cosine", **kw) == pytest.approx(0.55)
    assert lr_at(110, schedule="cosine", **kw) == pytest.approx(0.1)
    assert lr_at(50, schedule="wsd", decay_fraction=0.2, **kw) == 1.0
    assert lr_at(99, schedule="wsd", decay_fraction=0.2, **kw) == pytest.approx(
        1.0 + (0.1 - 1.0) * (99 - 88) / 22
    )
    assert lr_at(80, schedule="constant", **kw) == 1.0
    assert all(math.isfinite(lr_at(s, schedule="cosine", **kw)) for s in range(200))


def test_loss_falls_on_real_text(tmp_path: Path, shared_store: Path) -> None:
    """A tiny Pythia-style model learns the C4 sample and CPython source (../shared/data)."""
    cfg = fit_config(tmp_path, shared_store, "real", max_steps=80, limit_val_batches=0)
    assert (
        main(
            [
                "fit",
                "--config",
                str(cfg),
                "--data.init_args.weights",
                "{c4: 0.5, code: 0.5}",
                "--model.lr",
                "6e-3",
            ]
        )
        == 0
    )
    tags = scalars(tmp_path / "real")
    loss = [v for _, v in tags["train/loss"]]
    assert loss[0] == pytest.approx(math.log(1024), abs=0.5)  # starts near uniform
    assert sum(loss[-5:]) / 5 < sum(loss[:5]) / 5 - 0.8
    for d in ("c4", "code"):
        per_domain = [v for _, v in tags[f"train/loss/{d}"]]
        assert per_domain[-1] < per_domain[0] - 0.8
    assert "train/loss/gsm8k" not in tags  # weight 0: never drawn


def test_init_from_loads_weights_only(tmp_path: Path, builtin_store: Path) -> None:
    base = fit_config(tmp_path, builtin_store, "base", max_steps=3, limit_val_batches=0)
    assert main(["fit", "--config", str(base)]) == 0
    parent = tmp_path / "base" / "checkpoints" / "last.ckpt"
    child = fit_config(tmp_path, builtin_store, "child", max_steps=2, limit_val_batches=0)
    # max_steps=0 would not train; 1 step from the parent's weights with a fresh optimizer
    assert (
        main(
            [
                "fit",
                "--config",
                str(child),
                "--model.init_from",
                str(parent),
                "--model.warmup",
                "0",
                "--model.lr_schedule",
                "constant",
            ]
        )
        == 0
    )
    ckpt = torch.load(tmp_path / "child" / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 2  # a fresh run: the parent's 3 steps are not counted
    tags = scalars(tmp_path / "child")
    assert tags["train/lr"][0][1] == pytest.approx(3e-3)  # fresh schedule, not the parent's
    parent_loss = scalars(tmp_path / "base")["train/loss"]
    assert tags["train/loss"][0][1] < parent_loss[0][1] - 0.05  # starts from trained weights


def test_callbacks_plug_in_from_the_command_line(tmp_path: Path, builtin_store: Path) -> None:
    cfg = fit_config(tmp_path, builtin_store, "cb", max_steps=2, limit_val_batches=0)
    assert (
        main(
            [
                "fit",
                "--config",
                str(cfg),
                "--trainer.callbacks+=LearningRateMonitor",
                "--trainer.callbacks.logging_interval=step",
            ]
        )
        == 0
    )
    assert any(t.startswith("lr-AdamW") for t in scalars(tmp_path / "cb"))


def test_test_and_predict_commands(
    tmp_path: Path, builtin_store: Path, capsys: pytest.CaptureFixture
) -> None:
    cfg = fit_config(tmp_path, builtin_store, "tp", max_steps=2, limit_val_batches=0)
    assert main(["fit", "--config", str(cfg)]) == 0
    run_files = {p: p.stat().st_mtime_ns for p in (tmp_path / "tp").iterdir() if p.is_file()}
    ckpt = str(tmp_path / "tp" / "checkpoints" / "last.ckpt")
    capsys.readouterr()
    assert main(["test", "--config", str(cfg), "--ckpt_path", ckpt]) == 0
    table = capsys.readouterr().out.splitlines()
    assert any(line.startswith("test/loss") for line in table) and "math" in table[1]
    assert (
        main(
            [
                "predict",
                "--config",
                str(cfg),
                "--ckpt_path",
                ckpt,
                "--trainer.limit_predict_batches",
                "1",
            ]
        )
        == 0
    )
    # evaluation leaves the training run's config, hparams and events as they were
    assert {p: p.stat().st_mtime_ns for p in run_files} == run_files
    assert (tmp_path / "tp" / "test").is_dir()


def test_refused_resume_writes_nothing(tmp_path: Path, builtin_store: Path) -> None:
    cfg = fit_config(tmp_path, builtin_store, "r", max_steps=2, limit_val_batches=0)
    assert main(["fit", "--config", str(cfg)]) == 0
    before = {p: p.stat().st_mtime_ns for p in (tmp_path / "r").rglob("*")}
    assert (
        main(["fit", "--config", str(cfg), "--ckpt_path", "last", "--data.init_args.seed", "5"])
        == 2
    )
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "r").rglob("*")} == before


def test_throughput_is_logged(tmp_path: Path, builtin_store: Path) -> None:
    cfg = fit_config(tmp_path, builtin_store, "tp", max_steps=6, limit_val_batches=0)
    assert main(["fit", "--config", str(cfg), "--throughput.window_size", "2"]) == 0
    tags = scalars(tmp_path / "tp")
    sequences = tags["train/device/samples_per_sec"][-1][1]
    tokens = tags["train/device/items_per_sec"][-1][1]
    assert tokens == pytest.approx(sequences * 32, rel=1e-3)  # seq_len 32
    flops = tags["train/device/flops_per_sec"][-1][1]
    from midtrain.model.config import ModelConfig
    from midtrain.model.gpt import GPT

    model = GPT(
        ModelConfig.from_name("tiny", n_layer=2, n_embd=64, n_head=4, block_size=64, vocab_size=512)
    )
    assert flops == pytest.approx(tokens * model.flops_per_token(32), rel=1e-3)


def test_document_masking_and_activation_checkpointing(builtin_store: Path) -> None:
    from midtrain import CausalLM

    torch.manual_seed(0)
    plain = CausalLM(arch="tiny", vocab_size=512)
    plain.configure_model()
    masked = CausalLM(
        arch="tiny", vocab_size=512, document_masking=True, activation_checkpointing=True
    )
    masked.configure_model()
    masked.model.load_state_dict(plain.model.state_dict())
    masked.eos_id = plain.eos_id = 0
    x = torch.tensor([[5, 6, 7, 0, 8, 9, 10, 11]])
    batch = {"input_ids": x, "targets": torch.roll(x, -1, 1), "loss_mask": torch.ones(1, 8)}
    lm, _ = masked._token_losses(batch)
    lp, _ = plain._token_losses(batch)
    assert torch.allclose(lm[0, :4], lp[0, :4], atol=1e-5)  # the first document is the same
    second = {
        "input_ids": x[:, 4:],
        "targets": batch["targets"][:, 4:],
        "loss_mask": torch.ones(1, 4),
    }
    alone, _ = plain._token_losses(second)
    assert torch.allclose(lm[0, 4:], alone[0], atol=1e-5)  # the second sees only itself
    assert not torch.allclose(lp[0, 4:], alone[0], atol=1e-4)
    # activation checkpointing changes memory, not gradients
    lm.sum().backward()
    grads_ckpt = [p.grad.clone() for p in masked.model.parameters()]
    nockpt = CausalLM(arch="tiny", vocab_size=512, document_masking=True)
    nockpt.configure_model()
    nockpt.model.load_state_dict(plain.model.state_dict())
    nockpt.eos_id = 0
    nockpt._token_losses(batch)[0].sum().backward()
    for a, b in zip(grads_ckpt, (p.grad for p in nockpt.model.parameters()), strict=True):
        assert torch.allclose(a, b, atol=1e-6)


@pytest.mark.parametrize(
    "precision,dtype", [("bf16-mixed", torch.float32), ("bf16-true", torch.bfloat16)]
)
def test_bf16_precisions(
    tmp_path: Path, builtin_store: Path, precision: str, dtype: torch.dtype
) -> None:
    cfg = fit_config(
        tmp_path, builtin_store, "bf", max_steps=3, limit_val_batches=0, precision=precision
    )
    assert main(["fit", "--config", str(cfg)]) == 0
    assert all(math.isfinite(v) for _, v in scalars(tmp_path / "bf")["train/loss"])
    state = weights(tmp_path / "bf" / "checkpoints" / "last.ckpt")
    assert state["model.blocks.0.attn.qkv.weight"].dtype == dtype
