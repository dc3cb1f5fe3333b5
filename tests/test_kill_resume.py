"""A run killed with SIGKILL and resumed with `--ckpt_path last` ends bitwise equal to an
uninterrupted run: before, at and after a mixture switch and in the middle of a ramp, with
workers, accumulation and two data-parallel processes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
MAX_STEPS = 10
SWITCH = 5


def config(
    tmp_path: Path,
    store: Path,
    run: str,
    num_workers: int,
    accumulation: int,
    devices: int,
    slow: float,
    ramp_steps: int = 0,
) -> Path:
    cfg = {
        "seed_everything": 0,
        "model": {
            "arch": "tiny",
            "model_config": {"n_layer": 1, "n_embd": 32, "n_head": 2, "block_size": 64},
            "lr": 1e-3,
            "warmup": 2,
        },
        "data": {
            "class_path": "midtrain.MixtureDataModule",
            "init_args": {
                "store": str(store),
                "seq_len": 16,
                "micro_batch_size": 2,
                "weights": {"prose": 0.5, "code": 0.5},
                "num_workers": num_workers,
                "prefetch_factor": 2,
            },
        },
        "trainer": {
            "accelerator": "cpu",
            "devices": devices,
            "max_steps": MAX_STEPS,
            "accumulate_grad_batches": accumulation,
            "limit_val_batches": 0,
            "num_sanity_val_steps": 0,
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "default_root_dir": str(tmp_path / run),
            "strategy": "ddp" if devices > 1 else "auto",
            "callbacks": [
                {
                    "class_path": "midtrain.callbacks.MixtureSwitch",
                    "init_args": {
                        "weights": {"math": 0.6, "prose": 0.4},
                        "step": SWITCH,
                        "ramp_steps": ramp_steps,
                        "ramp": "cosine",
                    },
                },
                {"class_path": "tests.helpers.SlowDown", "init_args": {"seconds": slow}},
            ],
        },
        "checkpoint": {"every_n_train_steps": 1, "save_top_k": -1},
    }
    path = tmp_path / f"{run}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def midtrain(*args: str) -> subprocess.Popen:
    env = {**os.environ, "MASTER_PORT": str(20000 + os.getpid() % 20000)}
    return subprocess.Popen(
        [sys.executable, "-m", "midtrain", *args],
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )  # its own group: DDP children die with it


def finish(proc: subprocess.Popen) -> None:
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err.decode()[-3000:]


def weights(ckpt: Path) -> dict[str, torch.Tensor]:
    return torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]


@pytest.mark.parametrize(
    "kill_after,num_workers,accumulation,devices,ramp_steps",
    [
        pytest.param(SWITCH - 2, 0, 1, 1, 0, id="before-switch", marks=pytest.mark.slow),
        pytest.param(SWITCH, 0, 1, 1, 0, id="at-switch"),
        pytest.param(SWITCH + 2, 0, 1, 1, 0, id="after-switch", marks=pytest.mark.slow),
        pytest.param(SWITCH, 2, 2, 1, 0, id="workers2-accumulation2"),
        pytest.param(SWITCH + 1, 0, 1, 2, 0, id="ddp2"),
        pytest.param(SWITCH + 2, 0, 1, 1, 4, id="mid-ramp"),
        pytest.param(
            SWITCH + 1, 2, 2, 1, 4, id="mid-ramp-workers2-accumulation2", marks=pytest.mark.slow
        ),
        pytest.param(SWITCH + 2, 0, 1, 2, 4, id="mid-ramp-ddp2", marks=pytest.mark.slow),
    ],
)
def test_sigkill_then_resume_is_bitwise_exact(
    tmp_path: Path,
    builtin_store: Path,
    kill_after: int,
    num_workers: int,
    accumulation: int,
    devices: int,
    ramp_steps: int,
) -> None:
    ref = config(
        tmp_path, builtin_store, "ref", num_workers, accumulation, devices, 0.0, ramp_steps
    )
    finish(midtrain("fit", "--config", str(ref)))

    cfg = config(
        tmp_path, builtin_store, "run", num_workers, accumulation, devices, 0.3, ramp_steps
    )
    proc = midtrain("fit", "--config", str(cfg))
    marker = tmp_path / "run" / "checkpoints" / f"epoch=0-step={kill_after}.ckpt"
    deadline = time.monotonic() + 300
    while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    time.sleep(0.1)  # let the write finish; the run now sleeps after its batch
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    last = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)
    assert kill_after <= last["global_step"] < MAX_STEPS

    finish(midtrain("fit", "--config", str(cfg), "--ckpt_path", "last"))
    a = weights(tmp_path / "ref" / "checkpoints" / "last.ckpt")
    b = weights(tmp_path / "run" / "checkpoints" / "last.ckpt")
    assert (
        torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)["global_step"]
        == MAX_STEPS
    )
    for k in a:
        assert torch.equal(a[k], b[k]), k
