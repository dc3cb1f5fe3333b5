"""Two CPU processes (gloo): FSDP2 through Lightning's ModelParallelStrategy and DDP give the
losses of one process at the same global batch, and a 2-process sharded checkpoint resumes in
one process. Equal up to float reduction order (different world sizes sum in another order)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from midtrain.checkpoint.files import consolidate
from tests.test_training import scalars

REPO = Path(__file__).resolve().parents[1]
GLOBAL_BATCH = 8
FSDP2 = {
    "class_path": "lightning.pytorch.strategies.ModelParallelStrategy",
    "init_args": {"data_parallel_size": 2, "tensor_parallel_size": 1},
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def fit(
    tmp_path: Path,
    store: Path,
    run: str,
    devices: int,
    strategy: object = None,
    max_steps: int = 6,
    *extra: str,
    model: dict | None = None,
) -> Path:
    cfg = {
        "seed_everything": 0,
        "model": {
            **(
                model
                or {
                    "arch": "tiny",
                    "model_config": {"n_layer": 2, "n_embd": 64, "n_head": 4, "block_size": 64},
                }
            ),
            "lr": 3e-3,
            "warmup": 2,
        },
        "data": {
            "class_path": "midtrain.MixtureDataModule",
            "init_args": {
                "store": str(store),
                "seq_len": 32,
                "micro_batch_size": GLOBAL_BATCH // devices,
            },
        },
        "trainer": {
            "accelerator": "cpu",
            "devices": devices,
            "max_steps": max_steps,
            "log_every_n_steps": 1,
            "limit_val_batches": 0,
            "num_sanity_val_steps": 0,
            "default_root_dir": str(tmp_path / run),
            "enable_progress_bar": False,
            "enable_model_summary": False,
        },
        "checkpoint": {"every_n_train_steps": 2, "save_top_k": -1},
    }
    if strategy is not None:
        cfg["trainer"]["strategy"] = strategy
    path = tmp_path / f"{run}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    proc = subprocess.run(
        [sys.executable, "-m", "midtrain", "fit", "--config", str(path), *extra],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return tmp_path / run


def losses(run: Path) -> dict[int, float]:
    return dict(scalars(run)["train/loss"])


def state(ckpt: Path, tmp_path: Path) -> dict[str, torch.Tensor]:
    if ckpt.is_dir():
        ckpt = consolidate(ckpt, tmp_path / f"{ckpt.parent.parent.name}-{ckpt.name}.full")
    return torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]


def test_fsdp2_and_ddp_on_two_processes_match_one(tmp_path: Path, builtin_store: Path) -> None:
    one = fit(tmp_path, builtin_store, "one", 1)
    fsdp = fit(tmp_path, builtin_store, "fsdp", 2, FSDP2)
    ddp = fit(tmp_path, builtin_store, "ddp", 2, "ddp")
    reference = losses(one)
    assert sorted(reference) == list(range(6))
    for run in (fsdp, ddp):
        got = losses(run)
        assert sorted(got) == sorted(reference)
        for step, value in reference.items():
            assert got[step] == pytest.approx(value, rel=1e-5, abs=1e-6), (run.name, step)
    assert (fsdp / "checkpoints" / "last.ckpt" / "meta.pt").is_file()  # sharded checkpoint
    a = state(one / "checkpoints" / "last.ckpt", tmp_path)
    b = state(fsdp / "checkpoints" / "last.ckpt", tmp_path)
    assert a.keys() == b.keys()
    for k in a:
        # Adam divides by sqrt(v): reduction-order noise in near-zero gradients shows up in
        # the weights at well under a tenth of one step (lr 3e-3); a broken sharding or init
        # would differ by ~1e-2 or more
        assert torch.allclose(a[k], b[k], rtol=0, atol=5e-4), k


def test_two_process_checkpoint_resumes_in_one_process(tmp_path: Path, builtin_store: Path) -> None:
    two = fit(tmp_path, builtin_store, "two", 2, FSDP2)
    step2 = two / "checkpoints" / "epoch=0-step=2.ckpt"
    assert (step2 / "meta.pt").is_file()
    one_proc = {
        "class_path": "lightning.pytorch.strategies.ModelParallelStrategy",
        "init_args": {"data_parallel_size": 1, "tensor_parallel_size": 1},
    }
    resumed = fit(tmp_path, builtin_store, "resumed", 1, one_proc, 6, "--ckpt_path", str(step2))
    got, reference = losses(resumed), losses(two)
    assert sorted(got) == [2, 3, 4, 5]
    for step in got:
        assert got[step] == pytest.approx(reference[step], rel=1e-5, abs=1e-6), step
    a = state(two / "checkpoints" / "last.ckpt", tmp_path)
    b = state(resumed / "checkpoints" / "last.ckpt", tmp_path)
    for k in a:
        # Adam divides by sqrt(v): reduction-order noise in near-zero gradients shows up in
        # the weights at well under a tenth of one step (lr 3e-3); a broken sharding or init
        # would differ by ~1e-2 or more
        assert torch.allclose(a[k], b[k], rtol=0, atol=5e-4), k


# Today's bases: grouped-query attention with QK-norm (Qwen 3's per-head norm), SwiGLU, RMSNorm.
GQA_MODEL = {
    "arch": "llama-tiny",
    "model_config": {
        "n_layer": 2,
        "n_embd": 64,
        "n_head": 4,
        "n_query_groups": 2,
        "qk_norm": "per_head",
        "block_size": 64,
    },
}


@pytest.mark.slow
def test_fsdp2_gqa_model_on_two_processes_matches_one(tmp_path: Path, builtin_store: Path) -> None:
    one = fit(tmp_path, builtin_store, "one", 1, None, 4, model=GQA_MODEL)
    fsdp = fit(tmp_path, builtin_store, "fsdp", 2, FSDP2, 4, model=GQA_MODEL)
    reference, got = losses(one), losses(fsdp)
    assert sorted(got) == sorted(reference) == list(range(4))
    for step, value in reference.items():
        assert got[step] == pytest.approx(value, rel=1e-5, abs=1e-6), step
    a = state(one / "checkpoints" / "last.ckpt", tmp_path)
    b = state(fsdp / "checkpoints" / "last.ckpt", tmp_path)
    assert a.keys() == b.keys() and any(k.endswith("q_norm.weight") for k in a)
    for k in a:  # as above: reduction-order noise only
        assert torch.allclose(a[k], b[k], rtol=0, atol=5e-4), k
