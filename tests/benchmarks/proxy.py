"""The proxy sweep's cost (`tox -e bench`, or alone with `python -m tests.benchmarks.proxy`): a
48-step pretraining run of a tiny model on the built-in store with fork points at steps 8 and
24, then `midtrain advise --proxy` with 2 domains x 2 weights from both starts (8 proxies and 2
controls of 8 steps, each scored by `midtrain validate` on one SFT target). Reports the sweep's
wall time, per proxy (fork + score: two `midtrain` processes), and the compute it spends as a
fraction of the same candidates run as full branches. Figures, not assertions."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import yaml

from tests.benchmarks import print_figures
from tests.helpers import MODEL, QUIET


def _configs(root: Path, store: Path) -> tuple[Path, Path]:
    data = {"store": str(store), "weights": {"prose": 1.0}, "seq_len": 32, "micro_batch_size": 4}
    pre = {
        "seed_everything": 0,
        "model": {**MODEL, "lr": 3e-3},
        "data": {"class_path": "midtrain.MixtureDataModule", "init_args": data},
        "trainer": {**QUIET, "max_steps": 48, "limit_val_batches": 0},
    }
    sft_data = {
        "store": str(store),
        "target": "math",
        "general_store": str(store),
        "max_length": 32,
        "micro_batch_size": 4,
        "val_max_examples": 16,
        "general_val_max_blocks": 8,
    }
    sft = {
        "model": {**MODEL, "warmup": 0},
        "data": {"class_path": "midtrain.SFTDataModule", "init_args": sft_data},
        "trainer": {**QUIET, "max_steps": 2},
    }
    (root / "pre.yaml").write_text(yaml.safe_dump(pre))
    (root / "sft.yaml").write_text(yaml.safe_dump(sft))
    return root / "pre.yaml", root / "sft.yaml"


def bench_proxy_sweep(store: Path, root: Path) -> dict:
    from midtrain.cli import main
    from midtrain.study.sweep import load_sweep, run_sweep

    root.mkdir(parents=True, exist_ok=True)
    pre, sft = _configs(root, store)
    fork_points = ["--trainer.callbacks+=midtrain.callbacks.CheckpointAtSteps",
                   "--trainer.callbacks.steps=[8, 24]"]  # fmt: skip
    run = root / "run"
    assert (
        main(["fit", "--config", str(pre), *fork_points, f"--trainer.default_root_dir={run}"]) == 0
    )
    sweep = {
        "output": str(root / "sweep"),
        "run": str(run),
        "starts": [8, 24],
        "steps": 8,
        "candidates": {"grid": {"domain": ["code", "math"], "weight": [0.5, 1.0]}},
        "general": "prose",
        "sft": {"config": [str(sft)], "targets": {"math": {"target": "math"}}},
    }
    (root / "sweep.yaml").write_text(yaml.safe_dump(sweep))
    t0 = time.perf_counter()
    result = run_sweep(load_sweep(str(root / "sweep.yaml")), say=lambda _: None)
    seconds = time.perf_counter() - t0
    return {
        "proxies": len(result.proxies),
        "proxy_steps": result.proxy_steps,
        "full_branch_steps": result.full_steps,
        "compute_fraction": result.fraction,
        "seconds": seconds,
        "seconds_per_proxy": seconds / len(result.proxies),
        "best": result.best[0].best_measured,
        "goal": "figure: minutes for a sweep; the fraction is the point",
    }


def rows(r: dict) -> list[tuple[str, str, str, str]]:
    """Lines for the table of tests/benchmarks/run.py."""
    return [
        (
            "advise --proxy: sweep seconds (fork + validate each)",
            f"{r['seconds']:.0f}",
            f"{r['proxies']} runs, {r['seconds_per_proxy']:.1f}s each",
            r["goal"],
        ),
        (
            "advise --proxy: proxy steps / full-branch steps",
            f"{r['compute_fraction']:.3f}",
            f"{r['proxy_steps']} / {r['full_branch_steps']} optimizer steps",
            "figure",
        ),
    ]


def main() -> None:
    from tests.benchmarks.run import build_store

    with tempfile.TemporaryDirectory() as tmp:
        result = bench_proxy_sweep(build_store(Path(tmp)), Path(tmp) / "proxy")
    print_figures(rows(result), result)


if __name__ == "__main__":
    main()
