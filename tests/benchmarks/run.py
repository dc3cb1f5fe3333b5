"""Benchmarks (`tox -e bench`): figures, not assertions. Each figure is measured side by side
in one run, so machine noise cancels in the ratios. Prints a table, writes JSON.

    python -m tests.benchmarks.run [--out bench.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PHASES = [(0, {"prose": 1.0}), (6000, {"prose": 0.8, "code": 0.2}),
          (20000, {"prose": 0.68, "code": 0.2, "math": 0.12})]

FIRST_BATCH = r"""
import sys, time
t_import = time.perf_counter()
from midtrain.data.loader import MixtureStream
from midtrain.data.mixture import MixtureSchedule, Phase
from midtrain.data.store import Store
from torch.utils.data import DataLoader
store, start, phases = sys.argv[1], int(sys.argv[2]), eval(sys.argv[3])
s = Store(store)
domains = ["prose", "code", "math"]
sched = MixtureSchedule(domains, [Phase(a, w) for a, w in phases], batch_size=64, seed=0)
stream = MixtureStream([s.domain(d).train for d in domains], sched, 128, 16, 2, 0, 2,
                       start_step=start, max_steps=start + 100)
batch = next(iter(DataLoader(stream, batch_size=None, num_workers=2, prefetch_factor=2)))
print("first-batch", batch["input_ids"].shape[0])
"""


def build_store(root: Path) -> Path:
    sys.path.insert(0, str(REPO))
    from tests.conftest import BUILTIN_DOMAINS, prepare_store

    return prepare_store(root / "store", BUILTIN_DOMAINS, 512)


def time_to_first_batch(store: Path, start: int) -> float:
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", FIRST_BATCH, str(store), str(start), repr(PHASES)],
                         capture_output=True, text=True, check=True, cwd=REPO)
    assert "first-batch" in out.stdout
    return time.perf_counter() - t0


def bench_resume(store: Path, repeats: int = 5) -> dict:
    t0, t1m = [], []
    for _ in range(repeats):  # interleaved, so drift hits both alike
        t0.append(time_to_first_batch(store, 0))
        t1m.append(time_to_first_batch(store, 1_000_000))
    a, b = statistics.median(t0), statistics.median(t1m)
    return {"first_batch_s_step0": a, "first_batch_s_step1e6": b, "ratio": b / a, "goal": "<= 1.1"}


def bench_sampler(store: Path, steps: int = 300) -> dict:
    import numpy as np
    import torch

    torch.set_num_threads(1)
    from midtrain.data.loader import MixtureStream
    from midtrain.data.mixture import MixtureSchedule, Phase, block_indices, domain_key
    from midtrain.data.store import Store

    s = Store(store)
    domains = ["prose", "code", "math"]
    sched = MixtureSchedule(domains, [Phase(a, w) for a, w in PHASES], batch_size=1024, seed=0)
    blocks = [s.domain(d).train.num_blocks(128) for d in domains]
    t = time.perf_counter()
    for step in range(20000, 20000 + steps):  # indices only: the mixture's own cost
        d, n = sched.step(step)
        for k in range(3):
            block_indices(n[d == k], blocks[k], 0, domain_key(domains[k]))
    index_rate = steps * 1024 / (time.perf_counter() - t)
    stream = MixtureStream([s.domain(x).train for x in domains], sched, 128, 64, 16, 0, 1,
                           start_step=20000, max_steps=20000 + steps)
    t = time.perf_counter()
    n_micro = 16 * 20
    for i in range(20000 * 16, 20000 * 16 + n_micro):  # full micro-batches: tokens read too
        stream.micro_batch(i)
    batch_rate = n_micro * 64 / (time.perf_counter() - t)
    return {"index_sequences_per_s": index_rate, "batch_sequences_per_s": batch_rate,
            "goal": ">= 20000 sequences/s (one core)",
            "ratio_batch_vs_index": batch_rate / index_rate, "_np": np.__version__}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="bench.json")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        store = build_store(Path(tmp))
        results = {"machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                               "python": platform.python_version()},
                   "resume": bench_resume(store), "sampler": bench_sampler(store)}
    results["sampler"].pop("_np")
    r, s = results["resume"], results["sampler"]
    rows = [
        ("resume: time to first batch, step 1e6 / step 0", f"{r['ratio']:.3f}",
         f"{r['first_batch_s_step1e6']:.2f}s / {r['first_batch_s_step0']:.2f}s", r["goal"]),
        ("sampler: sequences/s (indices only, 1 core)", f"{s['index_sequences_per_s']:,.0f}",
         "", s["goal"]),
        ("sampler: sequences/s (micro-batches with tokens)", f"{s['batch_sequences_per_s']:,.0f}",
         "", s["goal"]),
    ]
    print(f"\n{'benchmark':<52} {'figure':>12}  {'detail':<22} goal")
    for name, fig, detail, goal in rows:
        print(f"{name:<52} {fig:>12}  {detail:<22} {goal}")
    Path(args.out).write_text(json.dumps(results, indent=2))
    print(f"\nwritten {args.out}")


if __name__ == "__main__":
    main()
