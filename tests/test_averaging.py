"""Weight averaging: the EMA callback (an independent recompute, val_ema/ tags, checkpoints
holding both weights, SIGKILL resume bitwise, --weights ema for validate and export) and
`midtrain average` (the soup is the elementwise mean; other shapes and bad input refused)."""

from __future__ import annotations

import json
import os
import re
import signal
import time
from pathlib import Path

import pytest
import torch
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from midtrain.checkpoint.average import average_checkpoints
from midtrain.cli.main import main
from midtrain.errors import MidtrainError
from tests.test_kill_resume import finish, midtrain

DECAY = 0.7  # a short horizon: the average differs visibly from the live weights in 6 steps
MAX_STEPS = 6


def config(
    tmp_path: Path,
    store: Path,
    run: str,
    ema: dict | None = None,
    model: dict | None = None,
    slow: float = 0.0,
    **trainer: object,
) -> Path:
    callbacks: list[dict] = [
        {"class_path": "midtrain.callbacks.EMA", "init_args": {"decay": DECAY, **(ema or {})}}
    ]
    if slow:
        callbacks.append({"class_path": "tests.helpers.SlowDown", "init_args": {"seconds": slow}})
    cfg = {
        "seed_everything": 0,
        "model": {
            "arch": "tiny",
            "model_config": {"n_layer": 1, "n_embd": 32, "n_head": 2, "block_size": 64},
            "lr": 1e-2,
            "warmup": 1,
            **(model or {}),
        },
        "data": {
            "class_path": "midtrain.MixtureDataModule",
            "init_args": {
                "store": str(store),
                "seq_len": 16,
                "micro_batch_size": 2,
                "weights": {"prose": 0.5, "code": 0.5},
                "val_max_blocks": 4,
            },
        },
        "trainer": {
            "accelerator": "cpu",
            "max_steps": MAX_STEPS,
            "num_sanity_val_steps": 0,
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "log_every_n_steps": 1,
            "default_root_dir": str(tmp_path / run),
            "callbacks": callbacks,
            **trainer,
        },
        "checkpoint": {"every_n_train_steps": 1, "save_top_k": -1},
    }
    path = tmp_path / f"{run}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def step_ckpt(run: Path, step: int) -> Path:
    return run / "checkpoints" / f"epoch=0-step={step}.ckpt"


@pytest.fixture(scope="module")
def ema_run(tmp_path_factory: pytest.TempPathFactory, builtin_store: Path) -> Path:
    """A 6-step run with EMA, a checkpoint every step and validation at steps 3 and 6."""
    tmp = tmp_path_factory.mktemp("ema")
    cfg = config(tmp, builtin_store, "run", val_check_interval=3)
    assert main(["fit", "--config", str(cfg)]) == 0
    return tmp / "run"


def test_ema_matches_an_independent_recompute(ema_run: Path) -> None:
    # The live weights after every optimizer step are in the per-step checkpoints; the EMA
    # (torch's documented rule: the first update copies, then d * ema + (1 - d) * live) is
    # recomputed from them in float64.
    live = [load(step_ckpt(ema_run, s))["state_dict"] for s in range(1, MAX_STEPS + 1)]
    expected = {k: v.double() for k, v in live[0].items()}
    for state in live[1:]:
        expected = {k: DECAY * expected[k] + (1 - DECAY) * state[k].double() for k in expected}
    last = load(ema_run / "checkpoints" / "last.ckpt")
    assert last["global_step"] == MAX_STEPS
    assert last["ema"]["n_averaged"] == MAX_STEPS and last["ema"]["decay"] == DECAY
    averaged = last["ema"]["state_dict"]
    assert set(averaged) == set(last["state_dict"])
    for k, v in expected.items():
        torch.testing.assert_close(averaged[k].double(), v, rtol=0, atol=1e-6)
    # the checkpoint's state_dict stays the live weights, and the average differs from them
    for k in live[-1]:
        assert torch.equal(last["state_dict"][k], live[-1][k]), k
    assert any(not torch.equal(averaged[k], live[-1][k]) for k in averaged)


def test_val_ema_tags_beside_val_tags(ema_run: Path) -> None:
    ea = EventAccumulator(str(ema_run))
    ea.Reload()
    tags = set(ea.Tags()["scalars"])
    for name in ("prose", "code"):
        for metric in ("loss", "bpb"):
            assert f"val/{name}/{metric}" in tags
            assert f"val_ema/{name}/{metric}" in tags
    live = {e.step: e.value for e in ea.Scalars("val/prose/loss")}
    averaged = {e.step: e.value for e in ea.Scalars("val_ema/prose/loss")}
    assert sorted(averaged) == sorted(live) and len(live) == 2
    assert all(averaged[s] != live[s] for s in live)  # two evaluations, not one value twice


def test_validate_and_export_read_the_averaged_weights(
    ema_run: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ckpt = str(ema_run / "checkpoints" / "last.ckpt")
    cfg = str(ema_run.parent / "run.yaml")
    results = {}
    for weights in ("live", "ema"):
        code = main(["validate", "--config", cfg, "--ckpt_path", ckpt, "--weights", weights])
        assert code == 0
        out = capsys.readouterr().out
        results[weights] = out
    assert "averaged (EMA) weights" in results["ema"]
    assert results["live"].splitlines()[1:] != results["ema"].splitlines()[1:]
    # the validate table of the averaged weights has the loss the run logged as val_ema
    ea = EventAccumulator(str(ema_run))
    ea.Reload()
    logged = ea.Scalars("val_ema/prose/loss")[-1].value
    assert f"{logged:.4f}" in results["ema"]


def test_export_weights_ema_and_the_soup(tmp_path: Path, ema_run: Path) -> None:
    pytest.importorskip("transformers")
    from safetensors.torch import load_file

    from midtrain.checkpoint.load import load_checkpoint
    from midtrain.model.hf import to_hf_state_dict

    ckpt = ema_run / "checkpoints" / "last.ckpt"
    out = tmp_path / "hf-ema"
    assert main(["export", "--ckpt", str(ckpt), "--out", str(out), "--weights", "ema"]) == 0
    config, averaged, _ = load_checkpoint(ckpt, weights="ema")
    expected = to_hf_state_dict(averaged, config)
    written = load_file(out / "model.safetensors")
    for k, v in expected.items():
        assert torch.equal(written[k], v), k
    assert json.loads((out / "midtrain.json").read_text())["weights"] == "ema"
    # a soup written elsewhere exports with its inputs' tokenizer
    soup = tmp_path / "elsewhere" / "soup.ckpt"
    average_checkpoints([step_ckpt(ema_run, 5), step_ckpt(ema_run, 6)], soup)
    assert main(["export", "--ckpt", str(soup), "--out", str(tmp_path / "hf-soup")]) == 0


def test_weights_ema_refused_without_an_average(
    tmp_path: Path, ema_run: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    plain = tmp_path / "plain.ckpt"
    state = load(ema_run / "checkpoints" / "last.ckpt")
    del state["ema"]
    torch.save(state, plain)
    cfg = str(ema_run.parent / "run.yaml")
    before = sorted(p.name for p in ema_run.rglob("*"))
    code = main(["validate", "--config", cfg, "--ckpt_path", str(plain), "--weights", "ema"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and str(plain) in err[0] and "no averaged" in err[0]
    assert sorted(p.name for p in ema_run.rglob("*")) == before
    code = main(["fit", "--config", cfg, "--weights", "ema"])
    assert code == 2 and "validate and test only" in capsys.readouterr().err


def test_resume_that_drops_or_changes_the_average_is_refused(
    tmp_path: Path, ema_run: Path, builtin_store: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ckpt = str(step_ckpt(ema_run, 3))
    no_ema = yaml.safe_load(config(tmp_path, builtin_store, "no-ema").read_text())
    no_ema["trainer"]["callbacks"] = []
    (tmp_path / "no-ema.yaml").write_text(yaml.safe_dump(no_ema))
    other_decay = config(tmp_path, builtin_store, "other-decay", ema={"decay": 0.5})
    for cfg, said in (
        (tmp_path / "no-ema.yaml", "no midtrain.callbacks.EMA"),
        (other_decay, "decay"),
    ):
        assert main(["fit", "--config", str(cfg), "--ckpt_path", ckpt]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and ckpt in err[0] and said in err[0], err
        assert not (tmp_path / cfg.stem).exists()


@pytest.mark.parametrize("bad", [{"decay": 1.0}, {"decay": 0.0}, {"update_every_n_steps": 0}])
def test_bad_ema_settings_are_one_line(
    tmp_path: Path, builtin_store: Path, bad: dict, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = config(tmp_path, builtin_store, "bad", ema=bad)
    assert main(["fit", "--config", str(cfg)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "EMA." in err[0], err
    assert not (tmp_path / "bad").exists()


def test_ema_resume_from_a_checkpoint_is_bitwise(
    tmp_path: Path, ema_run: Path, builtin_store: Path
) -> None:
    # the reference's step-3 checkpoint, resumed in a new run directory, ends where it ended
    cfg = config(tmp_path, builtin_store, "resumed", val_check_interval=3)
    ckpt = str(step_ckpt(ema_run, 3))
    assert main(["fit", "--config", str(cfg), "--ckpt_path", ckpt]) == 0
    a = load(ema_run / "checkpoints" / "last.ckpt")
    b = load(tmp_path / "resumed" / "checkpoints" / "last.ckpt")
    for key in ("state_dict",):
        for k in a[key]:
            assert torch.equal(a[key][k], b[key][k]), k
    assert a["ema"]["n_averaged"] == b["ema"]["n_averaged"]
    for k in a["ema"]["state_dict"]:
        assert torch.equal(a["ema"]["state_dict"][k], b["ema"]["state_dict"][k]), k


@pytest.mark.slow
def test_ema_sigkill_resume_is_bitwise(tmp_path: Path, builtin_store: Path) -> None:
    ref = config(tmp_path, builtin_store, "ref", limit_val_batches=0)
    finish(midtrain("fit", "--config", str(ref)))
    cfg = config(tmp_path, builtin_store, "run", slow=0.3, limit_val_batches=0)
    proc = midtrain("fit", "--config", str(cfg))
    marker = step_ckpt(tmp_path / "run", 3)
    deadline = time.monotonic() + 300
    while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    assert 3 <= load(tmp_path / "run" / "checkpoints" / "last.ckpt")["global_step"] < MAX_STEPS

    finish(midtrain("fit", "--config", str(cfg), "--ckpt_path", "last"))
    a = load(tmp_path / "ref" / "checkpoints" / "last.ckpt")
    b = load(tmp_path / "run" / "checkpoints" / "last.ckpt")
    assert b["global_step"] == MAX_STEPS
    for key in ("state_dict",):
        for k in a[key]:
            assert torch.equal(a[key][k], b[key][k]), k
    assert a["ema"]["n_averaged"] == b["ema"]["n_averaged"] == MAX_STEPS
    for k in a["ema"]["state_dict"]:
        assert torch.equal(a["ema"]["state_dict"][k], b["ema"]["state_dict"][k]), k


# -- midtrain average ----------------------------------------------------------------------------


def test_soup_is_the_elementwise_mean(tmp_path: Path, ema_run: Path) -> None:
    paths = [step_ckpt(ema_run, s) for s in (2, 4, 6)]
    out = tmp_path / "soup.ckpt"
    assert main(["average", *map(str, paths), "--out", str(out)]) == 0
    soup = load(out)
    states = [load(p)["state_dict"] for p in paths]
    assert set(soup["state_dict"]) == set(states[0])
    for k, v in soup["state_dict"].items():
        mean = torch.stack([s[k].double() for s in states]).mean(0)
        assert v.dtype == states[0][k].dtype
        assert torch.equal(v, mean.to(v.dtype)), k
    assert soup["global_step"] == 6 and soup["averaged_from"]["global_steps"] == [2, 4, 6]
    assert "optimizer_states" not in soup and "ema" not in soup


def test_soup_is_loadable_by_validate_and_init_from(
    tmp_path: Path, ema_run: Path, builtin_store: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "soup.ckpt"
    average_checkpoints([step_ckpt(ema_run, 5), step_ckpt(ema_run, 6)], out, weights="ema")
    cfg = str(ema_run.parent / "run.yaml")
    assert main(["validate", "--config", cfg, "--ckpt_path", str(out)]) == 0
    assert f"evaluating checkpoint {out}" in capsys.readouterr().out
    sft = config(tmp_path, builtin_store, "from-soup", model={"init_from": str(out)}, max_steps=1)
    assert main(["fit", "--config", str(sft), "--trainer.limit_val_batches", "0"]) == 0


def test_soup_of_another_model_or_bad_input_is_refused(
    tmp_path: Path, ema_run: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # another model config with the same tensors (rotary base): the weights mean another model
    other = load(step_ckpt(ema_run, 5))
    other["hyper_parameters"]["model_config"]["rotary_base"] = 500.0
    wide = tmp_path / "other-model.ckpt"
    torch.save(other, wide)
    a = step_ckpt(ema_run, 6)
    out = tmp_path / "soup.ckpt"
    capsys.readouterr()
    cases = [
        ([str(a), str(wide)], str(wide)),  # another model config
        ([str(a)], "at least 2"),
        ([str(a), str(tmp_path / "missing.ckpt")], "missing.ckpt"),
    ]
    for inputs, named in cases:
        assert main(["average", *inputs, "--out", str(out)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and named in err[0], err
        assert not out.exists()
    out.write_text("keep")
    assert main(["average", str(a), str(a), "--out", str(out)]) == 2
    assert "exists" in capsys.readouterr().err and out.read_text() == "keep"


def test_soup_with_other_parameters_names_the_file(tmp_path: Path, ema_run: Path) -> None:
    # same model config, but a tensor of another shape, or one missing (a hand-edited or
    # foreign checkpoint)
    first = step_ckpt(ema_run, 5)
    state = load(step_ckpt(ema_run, 6))
    name = next(iter(state["state_dict"]))
    state["state_dict"][name] = state["state_dict"][name][:1]
    odd = tmp_path / "odd.ckpt"
    torch.save(state, odd)
    gpt_name = name.removeprefix("model.")
    with pytest.raises(MidtrainError, match=re.escape(f"{odd}: {gpt_name} has shape (1, 32)")):
        average_checkpoints([first, odd], tmp_path / "soup.ckpt")
    del state["state_dict"][name]
    torch.save(state, odd)
    with pytest.raises(MidtrainError, match=re.escape(f"{odd} has other parameters than {first}")):
        average_checkpoints([first, odd], tmp_path / "soup.ckpt")
    assert not (tmp_path / "soup.ckpt").exists()


@pytest.mark.slow
def test_ema_under_ddp_validates_what_validate_reads(
    tmp_path: Path, builtin_store: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # two data-parallel processes: val_ema/ is reduced over both ranks, and is the loss that
    # `validate --weights ema` of the final checkpoint gives on one process
    cfg = config(tmp_path, builtin_store, "ddp", devices=2, strategy="ddp", val_check_interval=3)
    finish(midtrain("fit", "--config", str(cfg)))
    ea = EventAccumulator(str(tmp_path / "ddp"))
    ea.Reload()
    logged = ea.Scalars("val_ema/prose/loss")[-1].value
    one = config(tmp_path, builtin_store, "one", default_root_dir=str(tmp_path / "ddp"))
    ckpt = str(tmp_path / "ddp" / "checkpoints" / "last.ckpt")
    assert main(["validate", "--config", str(one), "--ckpt_path", ckpt, "--weights", "ema"]) == 0
    assert f"{logged:.4f}" in capsys.readouterr().out
