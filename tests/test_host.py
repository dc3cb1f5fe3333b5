"""midtrain.train.host: on the CPU the Trainer keeps freed blocks in the process, so a step's large
tensors reuse the previous step's memory instead of page-faulting fresh pages in."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(
    platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc's malloc only"
)

# Build a CPU Trainer, then allocate, fill and free a 64 MB tensor over and over (as every step
# does with its activations) and count the minor page faults of the rounds after the first ten.
PROBE = r"""
import json, resource, torch
from midtrain.train.host import allocator_chosen_by_user
from midtrain.train.trainer import Trainer
from midtrain.train import host
Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False)
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):  # the first rounds fault: the heap grows until the pattern fits in it
    torch.ones(16 * 2**20).sum()
before = faults()
for _ in range(5):
    torch.ones(16 * 2**20).sum()
print(json.dumps({"faults_per_round": (faults() - before) / 5, "applied": host._applied,
                  "chosen": allocator_chosen_by_user()}))
"""


def probe(**env: str) -> dict:
    base = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("MALLOC_")
        and k not in ("MIDTRAIN_KEEP_FREED_MEMORY", "GLIBC_TUNABLES", "LD_PRELOAD")
    }
    out = subprocess.run(
        [sys.executable, "-c", PROBE], capture_output=True, text=True, env=base | env, check=True
    ).stdout
    return json.loads(out.strip().splitlines()[-1])


def test_cpu_trainer_reuses_freed_blocks_instead_of_faulting_them_in():
    kept = probe()
    assert kept["applied"] is True
    # 64 MB is 16,384 pages: glibc's default maps and faults them in at every round
    default = probe(MIDTRAIN_KEEP_FREED_MEMORY="0")
    assert default["applied"] is False and default["chosen"] == "MIDTRAIN_KEEP_FREED_MEMORY"
    assert default["faults_per_round"] > 10_000
    assert kept["faults_per_round"] < 100


# (a preload that does not exist only warns: the allocator is recognised by its name)
@pytest.mark.parametrize(
    "env",
    [
        {"MALLOC_ARENA_MAX": "2"},
        {"LD_PRELOAD": "/nonexistent/libjemalloc.so.2"},
        {"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=1"},
    ],
)
def test_an_allocator_the_user_chose_is_left_alone(env):
    name = next(iter(env))
    result = probe(**env)
    assert result["applied"] is False and result["chosen"] == name


def test_a_wrong_value_is_named_in_one_line(tmp_path, builtin_store, monkeypatch, capsys):
    """`midtrain fit` with MIDTRAIN_KEEP_FREED_MEMORY=maybe stops before training, naming it
    in one line, and writes no run directory."""
    from midtrain.cli import main
    from tests.test_training import fit_config

    monkeypatch.setenv("MIDTRAIN_KEEP_FREED_MEMORY", "maybe")
    assert main(["fit", "--config", str(fit_config(tmp_path, builtin_store, "run"))]) != 0
    errors = [x for x in capsys.readouterr().err.splitlines() if "MIDTRAIN_KEEP" in x]
    assert errors == [
        "midtrain fit: error: MIDTRAIN_KEEP_FREED_MEMORY='maybe': use 0 to keep "
        "glibc's malloc defaults on the CPU, or 1 (the default) to keep freed "
        "memory"
    ]
    assert not (tmp_path / "run").exists()
