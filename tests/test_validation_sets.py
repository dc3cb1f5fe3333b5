"""A named validation set is the same blocks for any world size, accumulation and micro batch,
and validation runs at the same optimizer steps: 1 process vs 2 (DDP and FSDP2 on CPU, gloo),
accumulation 2 vs 1, all at the same global batch."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from midtrain.data.sft import ValidationExamples
from midtrain.data.store import Store
from midtrain.data.streams import ValidationBlocks
from tests.test_distributed import FSDP2, free_port
from tests.test_training import scalars

REPO = Path(__file__).resolve().parents[1]
SETS = ("prose", "code", "math")


def fit(
    tmp_path: Path,
    store: Path,
    run: str,
    devices: int,
    micro: int,
    accumulation: int,
    strategy: object = "auto",
) -> dict[str, list[tuple[int, float]]]:
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
                "micro_batch_size": micro,
                # 5 blocks in batches of 2: two processes hold 3 and 2
                # (+1 padding row), else 2 and 1 batches: FSDP2 would hang
                "val_max_blocks": 5,
                "val_batch_size": 2,
            },
        },
        "trainer": {
            "accelerator": "cpu",
            "devices": devices,
            "strategy": strategy,
            "max_steps": 4,
            "accumulate_grad_batches": accumulation,
            "val_check_interval": 2,
            "log_every_n_steps": 1,
            "num_sanity_val_steps": 0,
            "default_root_dir": str(tmp_path / run),
            "enable_progress_bar": False,
            "enable_model_summary": False,
        },
        "checkpoint": {"save_last": False},
    }
    path = tmp_path / f"{run}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    proc = subprocess.run(
        [sys.executable, "-m", "midtrain", "fit", "--config", str(path)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return scalars(tmp_path / run)


def test_validation_is_the_same_for_any_world_size_and_accumulation(
    tmp_path: Path, builtin_store: Path
) -> None:
    reference = fit(tmp_path, builtin_store, "one", 1, 8, 1)
    runs = {
        "accumulation 2": fit(tmp_path, builtin_store, "acc", 1, 4, 2),
        "ddp": fit(tmp_path, builtin_store, "ddp", 2, 4, 1, "ddp"),
        "fsdp2": fit(tmp_path, builtin_store, "fsdp", 2, 4, 1, FSDP2),
    }
    for name in SETS:
        expected = reference[f"val/{name}/loss"]
        # every 2 optimizer steps of 4: after steps 2 and 4 (logged at steps 1 and 3)
        assert [s for s, _ in expected] == [1, 3]
        for run, tags in runs.items():
            got = tags[f"val/{name}/loss"]
            assert [s for s, _ in got] == [1, 3], (run, name)
            for (_, a), (_, b) in zip(got, expected, strict=True):
                # training agrees to ~1e-7; a per-rank mean or a different block set would be
                # off by 1e-3 or more
                assert a == pytest.approx(b, rel=2e-5), (run, name)


def test_validation_blocks_shard_exactly(builtin_store: Path) -> None:
    """Ranks hold disjoint shares of the same first blocks, padded to equal rows with zero
    loss mask, so every rank runs the same number of batches."""
    split = Store(str(builtin_store)).domain("math").val
    whole = list(ValidationBlocks(split, 32, 3, 7))
    tokens = np.concatenate([b["input_ids"].numpy() for b in whole])
    assert len(tokens) == 7
    shares = [list(ValidationBlocks(split, 32, 3, 7, rank, 2)) for rank in range(2)]
    assert [len(s) for s in shares] == [2, 2]  # 4 rows each, batches of 3
    rows = {rank: [] for rank in range(2)}
    for rank, share in enumerate(shares):
        for b in share:
            for x, m in zip(b["input_ids"].numpy(), b["loss_mask"].numpy(), strict=True):
                if m.any():
                    rows[rank].append(x)
    assert len(rows[0]) == 4 and len(rows[1]) == 3
    np.testing.assert_array_equal(np.stack(rows[0]), tokens[0::2])
    np.testing.assert_array_equal(np.stack(rows[1]), tokens[1::2])
    assert shares[1][-1]["loss_mask"][-1].sum() == 0  # the padding row counts nothing


def test_sft_validation_examples_shard_exactly(builtin_store: Path) -> None:
    """SFT's validation examples follow the same rule: disjoint shares of the same first
    examples, equal rows on every rank, padding rows with zero loss mask."""
    split = Store(str(builtin_store)).domain("math").val
    pad = Store(str(builtin_store)).eos_id

    def masked_tokens(batches: list[dict]) -> float:
        return float(sum(b["loss_mask"].sum() for b in batches))

    whole = list(ValidationExamples(split, 64, 3, pad, 7))
    shares = [list(ValidationExamples(split, 64, 3, pad, 7, rank, 2)) for rank in range(2)]
    assert [len(s) for s in shares] == [2, 2]  # 4 rows each (one of rank 1's is padding)
    assert [sum(len(b["input_ids"]) for b in s) for s in shares] == [4, 4]
    assert masked_tokens(shares[0]) + masked_tokens(shares[1]) == masked_tokens(whole)
    assert shares[1][-1]["loss_mask"][-1].sum() == 0
