"""The LitGPT anchor (`tox -e bench-anchor`): `midtrain fit` vs `litgpt pretrain` at the same
shape on the same documents and tokenizer, eager vs eager and compiled vs compiled, runs
interleaved (LitGPT, midtrain, LitGPT, midtrain, ...) so machine noise hits both alike.
Figures, not assertions.

Tokens/s of a run is the tokens of one step over the median duration of the steps after
``warmup`` (each from the end of one optimizer step to the end of the next), the same on both
sides.

    python -m tests.benchmarks.anchor --litgpt-python PATH [--out bench-anchor.json]

LitGPT runs with ``--litgpt-python`` (an environment with litgpt and without midtrain: their
jsonargparse pins conflict); midtrain runs with this interpreter. Both sides are timed the same
way, by an optimizer step post-hook, so data loading, logging and clipping are all inside a
step's time.
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
from pathlib import Path

from tests.benchmarks.run import PEAK_RSS

REPO = Path(__file__).resolve().parents[2]
LITGPT_SIDE = Path(__file__).with_name("litgpt_side.py")

# The shape, and a pythia-70m-like one at seq 512 (fewer steps: ~8x the work per step).
SHAPES = {
    "issue (4L d256 seq256 b16 V8192)": dict(
        n_layer=4,
        n_embd=256,
        n_head=4,
        seq_len=256,
        micro_batch_size=16,
        vocab_size=8192,
        steps=30,
        warmup=5,
    ),
    "pythia-70m-like (6L d512 seq512 b8 V8192)": dict(
        n_layer=6,
        n_embd=512,
        n_head=8,
        seq_len=512,
        micro_batch_size=8,
        vocab_size=8192,
        steps=12,
        warmup=4,
    ),
}

MIDTRAIN_SIDE = (
    PEAK_RSS
    + r"""
import json, resource, sys, time
import torch
from torch.optim.optimizer import register_optimizer_step_post_hook
step_times, step_faults = [], []
register_optimizer_step_post_hook(lambda *_: (
    step_times.append(time.perf_counter()),
    step_faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt)))
from midtrain.cli import main
s = json.loads(sys.argv[1])
main(sys.argv[2:])
# optimizer steps warmup + 1 .. steps: durations, and minor page faults taken in each
w, n = s["warmup"], s["steps"]
print("step_seconds", json.dumps([b - a for a, b in zip(step_times[w - 1:n - 1], step_times[w:n])]))
print("step_faults", json.dumps([b - a for a, b in zip(step_faults[w - 1:n - 1], step_faults[w:n])]))
print("peak_rss_kb", peak_rss_kb())
"""
)


def documents() -> list[str]:
    """Real text that needs nothing outside the Python installation: the stdlib's docs and
    source (midtrain's built-in generators)."""
    from midtrain.data.builtin import python_docs, python_stdlib

    return [r["text"] for r in python_docs(max_docs=400)] + [
        r["text"] for r in python_stdlib(max_docs=200)
    ]


def build_data(root: Path) -> tuple[Path, Path, int]:
    """One jsonl of documents and a midtrain store of it with a vocab-8192 BPE trained here."""
    from midtrain.data.prepare import (
        DomainConfig,
        PrepareConfig,
        TokenizerConfig,
        TrainTokenizerConfig,
        prepare,
    )

    docs = root / "docs.jsonl"
    docs.write_text("".join(json.dumps({"text": t}) + "\n" for t in documents()))
    store = prepare(
        PrepareConfig(
            output=str(root / "store"),
            domains={"text": DomainConfig(source={"path": str(docs)}, val_fraction=0.0)},
            tokenizer=TokenizerConfig(train=TrainTokenizerConfig(vocab_size=8192, sample_docs=600)),
        )
    )
    eos_id = json.loads((Path(store) / "store.json").read_text())["eos_id"]
    return docs, Path(store), eos_id


def run_midtrain(
    store: Path, shape: dict, compile: bool, out: Path, env: dict[str, str] | None = None
) -> dict[str, float]:
    s = dict(shape)
    args = [
        "fit",
        "--seed_everything",
        "1234",
        "--model.arch",
        "pythia-70m",
        "--model.model_config",
        json.dumps(
            {
                "n_layer": s["n_layer"],
                "n_embd": s["n_embd"],
                "n_head": s["n_head"],
                "block_size": s["seq_len"],
                "vocab_size": s["vocab_size"],
            }
        ),
        "--model.lr",
        "3e-4",
        "--model.warmup",
        "0",
        "--model.compile",
        str(compile).lower(),
        "--data.class_path",
        "midtrain.MixtureDataModule",
        "--data.store",
        str(store),
        "--data.weights",
        '{"text": 1.0}',
        "--data.seq_len",
        str(s["seq_len"]),
        "--data.micro_batch_size",
        str(s["micro_batch_size"]),
        "--trainer.default_root_dir",
        str(out),
        "--trainer.max_steps",
        str(s["steps"]),
        "--trainer.accelerator",
        "cpu",
        "--trainer.devices",
        "1",
        "--trainer.precision",
        "32-true",
        "--trainer.gradient_clip_val",
        "1.0",
        "--trainer.log_every_n_steps",
        "1",
        "--trainer.limit_val_batches",
        "0",
        "--trainer.enable_progress_bar",
        "false",
    ]
    return _run([sys.executable, "-c", MIDTRAIN_SIDE, json.dumps(s), *args], s, env)


def run_litgpt(
    python: str, docs: Path, store: Path, eos_id: int, shape: dict, compile: bool, out: Path
) -> dict[str, float]:
    s = dict(shape, compile=compile)
    return _run(
        [python, str(LITGPT_SIDE), str(docs), str(store), str(eos_id), str(out), json.dumps(s)], s
    )


def _run(cmd: list[str], shape: dict, env: dict[str, str] | None = None) -> dict[str, float]:
    """One run's ``tokens_per_s``: the tokens of a step over the median step time after warmup
    (a median, not the window's mean: on a shared machine a few steps slowed by a neighbour's
    burst would otherwise decide the figure); its median ``minor_faults_per_step``; and the
    process's ``peak_rss_mb``."""
    env = dict(
        os.environ,
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        **(env or {}),
    )
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env)
    found = {
        line.split(maxsplit=1)[0]: json.loads(line.split(maxsplit=1)[1])
        for line in proc.stdout.splitlines()
        if line.startswith(("step_seconds ", "step_faults ", "peak_rss_kb "))
    }
    if proc.returncode != 0 or len(found) != 3:
        raise RuntimeError(f"{cmd[0]} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    if len(found["step_seconds"]) != shape["steps"] - shape["warmup"]:
        raise RuntimeError(
            f"{cmd[0]} ran {len(found['step_seconds'])} timed steps, not "
            f"{shape['steps'] - shape['warmup']}:\n{proc.stderr[-4000:]}"
        )
    return {
        "tokens_per_s": shape["micro_batch_size"]
        * shape["seq_len"]
        / statistics.median(found["step_seconds"]),
        "minor_faults_per_step": statistics.median(found["step_faults"]),
        "peak_rss_mb": found["peak_rss_kb"] / 1024,
    }


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--litgpt-python", required=True)
    parser.add_argument("--out", default="bench-anchor.json")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--shapes", nargs="*", default=list(SHAPES), help="which shapes (default: all)"
    )
    parser.add_argument(
        "--steps",
        type=int,
        help="override every shape's steps (and --warmup): a shorter run on a busy machine",
    )
    parser.add_argument("--warmup", type=int)
    parser.add_argument("--modes", nargs="*", default=["eager", "compiled"])
    args = parser.parse_args()
    version = subprocess.run(
        [args.litgpt_python, "-c", "import importlib.metadata as m; print(m.version('litgpt'))"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    results: dict = {
        "machine": {"cpus": os.cpu_count(), "cpu": cpu_model(), "platform": platform.platform()},
        "litgpt": version,
        "shapes": {},
    }
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        docs, store, eos_id = build_data(root)
        for k, name in enumerate(args.shapes):
            shape = dict(SHAPES[name])
            if args.steps:
                shape.update(steps=args.steps, warmup=args.warmup or shape["warmup"])
            shape_out = results["shapes"][name] = {"shape": shape}
            for mode in args.modes:
                compile = mode == "compiled"
                lit, mid = [], []
                faults: dict[str, list[float]] = {"litgpt": [], "midtrain": []}
                rss: dict[str, list[float]] = {"litgpt": [], "midtrain": []}
                for i in range(args.repeats):  # interleaved
                    run = run_litgpt(
                        args.litgpt_python,
                        docs,
                        store,
                        eos_id,
                        shape,
                        compile,
                        root / f"lit-{k}-{mode}-{i}",
                    )
                    lit.append(run["tokens_per_s"])
                    faults["litgpt"].append(run["minor_faults_per_step"])
                    rss["litgpt"].append(run["peak_rss_mb"])
                    # a run directory of its own: midtrain refuses a fresh fit into another's
                    run = run_midtrain(store, shape, compile, root / f"mid-{k}-{mode}-{i}")
                    mid.append(run["tokens_per_s"])
                    faults["midtrain"].append(run["minor_faults_per_step"])
                    rss["midtrain"].append(run["peak_rss_mb"])
                    print(
                        f"{name}, {mode}, run {i}: LitGPT {lit[-1]:,.0f} tokens/s "
                        f"({faults['litgpt'][-1]:,.0f} page faults/step), midtrain "
                        f"{mid[-1]:,.0f} tokens/s ({faults['midtrain'][-1]:,.0f}); peak RSS "
                        f"{rss['litgpt'][-1]:,.0f} / {rss['midtrain'][-1]:,.0f} MB",
                        flush=True,
                    )
                ratio = statistics.median(mid) / statistics.median(lit)
                shape_out[mode] = {
                    "litgpt_tokens_per_s": lit,
                    "midtrain_tokens_per_s": mid,
                    "ratio": ratio,
                    **{f"{side}_minor_faults_per_step": f for side, f in faults.items()},
                    **{f"{side}_peak_rss_mb": r for side, r in rss.items()},
                }
                rows.append(
                    (
                        f"{name}, {mode}",
                        ratio,
                        lit,
                        mid,
                        f"{statistics.median(faults['litgpt']):,.0f} / "
                        f"{statistics.median(faults['midtrain']):,.0f}",
                    )
                )
            if "eager" in shape_out and "compiled" in shape_out:
                for side in ("litgpt", "midtrain"):
                    key = f"{side}_tokens_per_s"
                    gain = statistics.median(shape_out["compiled"][key]) / statistics.median(
                        shape_out["eager"][key]
                    )
                    shape_out[f"{side}_compiled_over_eager"] = gain
                    rows.append((f"{name}, {side} compiled / eager", gain, [], [], ""))
    print(
        f"\nLitGPT {version} anchor on {results['machine']['cpus']} CPUs "
        f"({results['machine']['cpu']}); tokens/s per run, ratio of medians"
    )
    print(
        f"{'shape, mode':<66} {'ratio':>7}  {'LitGPT':<20} {'midtrain':<20} "
        "page faults/step (LitGPT / midtrain)"
    )
    for name, ratio, lit, mid, faults_row in rows:
        print(
            f"{name:<66} {ratio:>7.3f}  {' / '.join(f'{x:,.0f}' for x in lit):<20} "
            f"{' / '.join(f'{x:,.0f}' for x in mid):<20} {faults_row}"
        )
    Path(args.out).write_text(json.dumps(results, indent=2))
    print(f"\nwritten {args.out}")


if __name__ == "__main__":
    main()
