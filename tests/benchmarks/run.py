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
PHASES = [
    (0, {"prose": 1.0}),
    (6000, {"prose": 0.8, "code": 0.2}),
    (20000, {"prose": 0.68, "code": 0.2, "math": 0.12}),
]

FIRST_BATCH = r"""
import sys, time
t_import = time.perf_counter()
from midtrain.data.streams import BatchLayout, MixtureStream
from midtrain.data.mixture import MixtureSchedule, Phase
from midtrain.data.store import Store
from torch.utils.data import DataLoader
store, start, phases = sys.argv[1], int(sys.argv[2]), eval(sys.argv[3])
s = Store(store)
domains = ["prose", "code", "math"]
sched = MixtureSchedule(domains, [Phase(a, w) for a, w in phases], batch_size=64, seed=0)
stream = MixtureStream([s.domain(d).train for d in domains], sched, 128, BatchLayout(16, 2, 0, 2),
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
    out = subprocess.run(
        [sys.executable, "-c", FIRST_BATCH, str(store), str(start), repr(PHASES)],
        capture_output=True,
        text=True,
        check=True,
        cwd=REPO,
    )
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
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one core; restored below (the benchmarks after it use all)
    try:
        return _bench_sampler(store, steps)
    finally:
        torch.set_num_threads(threads)


def _bench_sampler(store: Path, steps: int) -> dict:
    import numpy as np

    from midtrain.data.mixture import MixtureSchedule, Phase, block_indices, domain_key
    from midtrain.data.store import Store
    from midtrain.data.streams import BatchLayout, MixtureStream

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
    stream = MixtureStream(
        [s.domain(x).train for x in domains],
        sched,
        128,
        BatchLayout(64, 16),
        start_step=20000,
        max_steps=20000 + steps,
    )
    t = time.perf_counter()
    n_micro = 16 * 20
    for i in range(20000 * 16, 20000 * 16 + n_micro):  # full micro-batches: tokens read too
        stream.micro_batch(i)
    batch_rate = n_micro * 64 / (time.perf_counter() - t)
    return {
        "index_sequences_per_s": index_rate,
        "batch_sequences_per_s": batch_rate,
        "goal": ">= 20000 sequences/s (one core)",
        "ratio_batch_vs_index": batch_rate / index_rate,
        "_np": np.__version__,
    }


def bench_training_overhead(store: Path, steps: int = 30, warmup: int = 5) -> dict:
    """`midtrain fit` (mixture sampler, per-domain metrics, TensorBoard, throughput) vs a plain
    PyTorch loop on the same model, optimizer and batches: tokens/s of each, measured twice,
    interleaved."""
    import lightning as L
    import torch

    from midtrain import CausalLM, MixtureDataModule
    from midtrain.model.loss import chunked_cross_entropy
    from midtrain.train.callbacks.throughput import Throughput
    from midtrain.train.optim import fused_adamw_supported, param_groups
    from midtrain.train.trainer import Trainer

    shape = {"n_layer": 4, "n_embd": 128, "n_head": 4, "block_size": 256}
    micro, seq = 8, 256

    class Clock(L.Callback):
        def on_train_batch_start(self, trainer, *_):
            if trainer.global_step == warmup:
                self.t0 = time.perf_counter()

        def on_train_end(self, trainer, *_):
            self.seconds = time.perf_counter() - self.t0

    def with_lightning(tmp: Path) -> float:
        dm = MixtureDataModule(str(store), seq_len=seq, micro_batch_size=micro)
        torch.manual_seed(0)
        lm = CausalLM(arch="tiny", model_config=shape, vocab_size=dm.vocab_size, warmup=0)
        clock = Clock()
        from lightning.pytorch.loggers import TensorBoardLogger

        trainer = Trainer(
            accelerator="cpu",
            devices=1,
            max_steps=steps,
            logger=TensorBoardLogger(str(tmp), name="", version=""),
            log_every_n_steps=1,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            limit_val_batches=0,
            num_sanity_val_steps=0,
            callbacks=[clock, Throughput()],
        )
        trainer.fit(lm, dm)
        return (steps - warmup) * micro * seq / clock.seconds

    def plain() -> float:
        dm = MixtureDataModule(str(store), seq_len=seq, micro_batch_size=micro)
        sched = dm.schedule(micro)
        from midtrain.data.streams import BatchLayout, MixtureStream

        stream = MixtureStream(
            [dm.store.domain(d).train for d in sched.domains],
            sched,
            seq,
            BatchLayout(micro),
            0,
            steps,
        )
        torch.manual_seed(0)
        lm = CausalLM(arch="tiny", model_config=shape, vocab_size=dm.vocab_size)
        lm.configure_model()
        model = lm.model
        # the same optimizer and loss as fit: the ratio is the trainer's overhead alone
        opt = torch.optim.AdamW(
            param_groups(model, 0.1), lr=3e-4, betas=(0.9, 0.95), fused=fused_adamw_supported(model)
        )
        for i, batch in enumerate(stream):  # the same batches, built on the fly as fit does
            if i == warmup:
                t0 = time.perf_counter()
            losses = chunked_cross_entropy(
                model.features(batch["input_ids"]),
                model.lm_head.weight,
                batch["targets"],
                batch["loss_mask"],
                lm.hparams.loss_chunk_size,
            )
            loss = losses.sum() / batch["loss_mask"].sum()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
        return (steps - warmup) * micro * seq / (time.perf_counter() - t0)

    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(2):
            runs.append((with_lightning(Path(tmp) / str(i)), plain()))
    fit = statistics.median(r[0] for r in runs)
    base = statistics.median(r[1] for r in runs)
    return {
        "fit_tokens_per_s": fit,
        "plain_tokens_per_s": base,
        "ratio": fit / base,
        "goal": ">= 0.97",
    }


def bench_host_memory(root: Path, repeats: int = 2) -> dict:
    """`midtrain fit` at the LitGPT anchor's issue shape with freed host memory kept in the
    process (the default on the CPU, ``midtrain.train.host``) ÷ with glibc's defaults
    (``MIDTRAIN_KEEP_FREED_MEMORY=0``): tokens/s (median step) and minor page faults per step,
    interleaved runs."""
    from tests.benchmarks import anchor

    root.mkdir(parents=True, exist_ok=True)
    _, store, _ = anchor.build_data(root)
    shape = next(v for k, v in anchor.SHAPES.items() if k.startswith("issue"))
    runs: dict[str, list[dict[str, float]]] = {"kept": [], "glibc_default": []}
    for i in range(repeats):
        for name, env in (("glibc_default", {"MIDTRAIN_KEEP_FREED_MEMORY": "0"}), ("kept", {})):
            runs[name].append(
                anchor.run_midtrain(store, shape, False, root / f"{name}-{i}", env=env)
            )
    out: dict = {"shape": shape, "runs": runs, "goal": "figure"}
    for name, r in runs.items():
        out[f"{name}_tokens_per_s"] = statistics.median(x["tokens_per_s"] for x in r)
        out[f"{name}_minor_faults_per_step"] = statistics.median(
            x["minor_faults_per_step"] for x in r
        )
        out[f"{name}_peak_rss_mb"] = statistics.median(x["peak_rss_mb"] for x in r)
    out["ratio"] = out["kept_tokens_per_s"] / out["glibc_default_tokens_per_s"]
    return out


# A subprocess's own peak RSS. Not ru_maxrss: on Linux a child started by fork + exec inherits
# its parent's high-water mark there, so every figure would start at the benchmark's own size.
PEAK_RSS = r"""
import resource
def peak_rss_kb():
    try:
        with open("/proc/self/status") as f:
            return next(int(x.split()[1]) for x in f if x.startswith("VmHWM:"))
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
"""

LOADER = (
    PEAK_RSS
    + r"""
import resource, sys, time
from torch.utils.data import DataLoader
from midtrain.data.streams import BatchLayout, MixtureStream
from midtrain.data.mixture import MixtureSchedule, Phase
from midtrain.data.store import Store
s = Store(sys.argv[1])
sched = MixtureSchedule(["big"], [Phase(0, {"big": 1.0})], batch_size=16, seed=0)
stream = MixtureStream([s.domain("big").train], sched, 2048, BatchLayout(16), 0, 200)
t0 = time.perf_counter(); n = 0
for batch in DataLoader(stream, batch_size=None, num_workers=2, prefetch_factor=2):
    n += batch["input_ids"].shape[0]
rate = n / (time.perf_counter() - t0)
self_kb = peak_rss_kb()
child_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss  # workers: fork, no exec
print(rate, self_kb, child_kb)
"""
)


def synthetic_store(root: Path, tokens: int) -> Path:
    """A one-domain store of random uint16 tokens (written in chunks: memory stays flat)."""
    import numpy as np

    d = root / "big"
    d.mkdir(parents=True)
    rng = np.random.default_rng(0)
    with (d / "train.tokens").open("wb") as f:
        left = tokens
        while left:
            n = min(left, 50_000_000)
            rng.integers(0, 50000, n, dtype=np.uint16).tofile(f)
            left -= n
    np.array([0, tokens], dtype=np.int64).tofile(d / "train.docs")
    np.array([tokens * 4], dtype=np.int64).tofile(d / "train.bytes")
    for ext in ("tokens", "docs", "bytes"):
        (d / f"val.{ext}").write_bytes(b"")
    np.zeros(1, dtype=np.int64).tofile(d / "val.docs")
    (d / "manifest.json").write_text(
        json.dumps({"name": "big", "dtype": "uint16", "content_hash": str(tokens)})
    )
    (root / "store.json").write_text(
        json.dumps(
            {
                "format_version": 2,
                "domains": ["big"],
                "vocab_size": 50304,
                "eos_id": 0,
                "tokenizer_hash": "synthetic",
            }
        )
    )
    return root


def bench_loader(root: Path) -> dict:
    """Train-loader sequences/s and peak RSS (main + worker processes) on a ~2 GB store vs a
    ~20 MB store: memory-mapped, so RSS must not follow the store size."""
    out = {}
    for name, tokens in (("20MB", 10_000_000), ("2GB", 1_000_000_000)):
        store = synthetic_store(root / name, tokens)
        proc = subprocess.run(
            [sys.executable, "-c", LOADER, str(store)],
            capture_output=True,
            text=True,
            check=True,
            cwd=REPO,
        )
        rate, self_kb, child_kb = proc.stdout.split()
        out[name] = {
            "sequences_per_s": float(rate),
            "peak_rss_mb_main": int(self_kb) / 1024,
            "peak_rss_mb_worker": int(child_kb) / 1024,
        }
        import shutil

        shutil.rmtree(root / name)
    big, small = out["2GB"], out["20MB"]
    out["rss_difference_mb"] = (
        big["peak_rss_mb_main"]
        + big["peak_rss_mb_worker"]
        - small["peak_rss_mb_main"]
        - small["peak_rss_mb_worker"]
    )
    out["goal"] = "RSS within 100 MB of each other"
    return out


LOSS_MEMORY = (
    PEAK_RSS
    + r"""
import sys, torch
from midtrain.model.loss import chunked_cross_entropy, cross_entropy
chunk, seq, dim, vocab = (int(a) for a in sys.argv[1:5])
torch.manual_seed(0)
x = torch.randn(seq, dim, requires_grad=True)
w = (torch.randn(vocab, dim) * 0.02).requires_grad_()
w.grad = torch.zeros_like(w); x.grad = torch.zeros_like(x)  # in both paths: not the logits'
t, m = torch.randint(0, vocab, (seq,)), torch.ones(seq)
before = peak_rss_kb()
losses = chunked_cross_entropy(x, w, t, m, chunk) if chunk else cross_entropy(x, w, t, m)
(losses.sum() / seq).backward()
print(before, peak_rss_kb())
"""
)


def bench_loss_memory(seq: int = 2048, dim: int = 512, vocab: int = 50304) -> dict:
    """Peak RSS added by the loss's forward and backward for one sequence (pythia-70m width,
    vocab 50,304, seq 2048), each in a fresh process: the full fp32 logits vs chunks."""
    out: dict = {
        "shape": {"seq": seq, "dim": dim, "vocab": vocab},
        "full_logits_mb": seq * vocab * 4 / 2**20,
    }
    for name, chunk in (("plain", 0), ("chunked_1024", 1024), ("chunked_256", 256)):
        proc = subprocess.run(
            [sys.executable, "-c", LOSS_MEMORY, str(chunk), str(seq), str(dim), str(vocab)],
            capture_output=True,
            text=True,
            check=True,
            cwd=REPO,
        )
        before, after = (int(v) for v in proc.stdout.split())
        out[f"{name}_peak_rss_mb"] = (after - before) / 1024
    out["ratio"] = out["chunked_1024_peak_rss_mb"] / out["plain_peak_rss_mb"]
    out["goal"] = "chunked well below the full logits"
    return out


GPU_MFU = r"""
import sys, time, warnings
import lightning as L
import torch
from lightning.fabric.utilities.throughput import get_available_flops
from lightning.pytorch.strategies import ModelParallelStrategy
from midtrain import CausalLM, MixtureDataModule
from midtrain.train.trainer import Trainer

arch, store, steps, warmup = sys.argv[1], sys.argv[2], 30, 10
devices = torch.cuda.device_count()

class Clock(L.Callback):
    def on_train_batch_start(self, trainer, *_):
        if trainer.global_step == warmup:
            torch.cuda.synchronize()
            self.t0 = time.perf_counter()
    def on_train_end(self, trainer, *_):
        torch.cuda.synchronize()
        self.seconds = time.perf_counter() - self.t0

class SyncCounter(L.Callback):
    # Host syncs inside non-logging steps (batch start to batch end: forward, backward,
    # clipping, optimizer step and every callback), counted by torch's CUDA sync debug mode,
    # which warns at each synchronizing call. Goal: 0.
    def __init__(self):
        self.syncs = self.steps = 0
        self.counting = False
        shown = warnings.showwarning
        def count(message, *args, **kwargs):
            if self.counting and "synchroniz" in str(message):
                self.syncs += 1
            else:
                shown(message, *args, **kwargs)
        warnings.showwarning = count
        warnings.simplefilter("always")
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        step = trainer.global_step
        self.counting = step >= warmup and not pl_module.is_logging_step(step)
        if self.counting:
            torch.cuda.set_sync_debug_mode("warn")
    def on_train_batch_end(self, trainer, *_):
        if self.counting:
            torch.cuda.set_sync_debug_mode("default")
            self.steps += 1
        self.counting = False

dm = MixtureDataModule(store, seq_len=2048, micro_batch_size=8, num_workers=4)
lm = CausalLM(arch=arch, model_config={"vocab_size": 50304}, compile=True, warmup=0)
clock, syncs = Clock(), SyncCounter()
trainer = Trainer(accelerator="gpu", devices=devices, precision="bf16-mixed", max_steps=steps,
                  strategy=ModelParallelStrategy(data_parallel_size=devices, tensor_parallel_size=1),
                  logger=False, enable_checkpointing=False, enable_progress_bar=False,
                  limit_val_batches=0, num_sanity_val_steps=0, callbacks=[clock, syncs],
                  log_every_n_steps=10)
trainer.fit(lm, dm)
if trainer.is_global_zero:
    tokens = (steps - warmup) * 8 * 2048 * devices
    flops = lm.flops_per_batch / (8 * 2048) * tokens
    peak = get_available_flops(torch.device("cuda"), torch.bfloat16) * devices
    print("syncs", syncs.syncs, syncs.steps)
    print("mfu", flops / clock.seconds / peak, tokens / clock.seconds, torch.cuda.get_device_name())
"""


def bench_gpu(store: Path) -> dict:
    """MFU of pythia-160m and pythia-410m, bf16-mixed, FSDP2 over every visible GPU, compiled,
    seq 2048 (goal: >= 50% on an H100), and the CUDA host syncs counted in the non-logging steps
    (goal: 0). Needs CUDA; the store's vocabulary must fit 50,304.
    Written without a GPU at hand: unverified until it runs on one."""
    import torch

    if not torch.cuda.is_available():
        return {
            "skipped": "no CUDA device: MFU of pythia-160m/410m (bf16, FSDP2, compile) "
            "runs only on a GPU machine"
        }
    out: dict = {"goal": ">= 0.5 on an H100"}
    for arch in ("pythia-160m", "pythia-410m"):
        proc = subprocess.run(
            [sys.executable, "-c", GPU_MFU, arch, str(store)],
            capture_output=True,
            text=True,
            cwd=REPO,
        )
        line = [x for x in proc.stdout.splitlines() if x.startswith("mfu")]
        syncs = [x.split()[1:] for x in proc.stdout.splitlines() if x.startswith("syncs")]
        if proc.returncode != 0 or not line:
            out[arch] = {"error": proc.stderr.strip().splitlines()[-1:] or ["failed"]}
            continue
        _, mfu, tokens_per_s, *device = line[-1].split()
        out[arch] = {
            "mfu": float(mfu),
            "tokens_per_s": float(tokens_per_s),
            "device": " ".join(device),
            "host_syncs_in_non_logging_steps": int(syncs[-1][0]) if syncs else None,
            "non_logging_steps": int(syncs[-1][1]) if syncs else None,
        }
    return out


def main() -> None:
    from tests.benchmarks import advise as advise_bench
    from tests.benchmarks import breakdown
    from tests.benchmarks import corpora as corpora_bench
    from tests.benchmarks import prepare as prepare_bench
    from tests.benchmarks import proxy as proxy_bench

    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="bench.json")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        store = build_store(Path(tmp))
        results = {
            "machine": {
                "cpus": os.cpu_count(),
                "platform": platform.platform(),
                "python": platform.python_version(),
            },
            "resume": bench_resume(store),
            "sampler": bench_sampler(store),
            "training": bench_training_overhead(store),
            "host_memory": bench_host_memory(Path(tmp) / "host"),
            "prepare_parallel": prepare_bench.bench_prepare_parallel(Path(tmp) / "pp"),
            "loader": bench_loader(Path(tmp) / "loader"),
            "loss_memory": bench_loss_memory(),
            "step_breakdown": breakdown.in_fresh_process(),
            "gpu": bench_gpu(store),
            "advise": advise_bench.bench_advise(store),
            "corpora": corpora_bench.bench_corpora(Path(tmp) / "corpora"),
            "proxy_sweep": proxy_bench.bench_proxy_sweep(store, Path(tmp) / "proxy"),
        }
    results["sampler"].pop("_np")
    r, s = results["resume"], results["sampler"]
    rows = [
        (
            "resume: time to first batch, step 1e6 / step 0",
            f"{r['ratio']:.3f}",
            f"{r['first_batch_s_step1e6']:.2f}s / {r['first_batch_s_step0']:.2f}s",
            r["goal"],
        ),
        (
            "sampler: sequences/s (indices only, 1 core)",
            f"{s['index_sequences_per_s']:,.0f}",
            "",
            s["goal"],
        ),
        (
            "sampler: sequences/s (micro-batches with tokens)",
            f"{s['batch_sequences_per_s']:,.0f}",
            "",
            s["goal"],
        ),
    ]
    t, ld, h = results["training"], results["loader"], results["host_memory"]
    rows += [
        (
            "training: midtrain fit tokens/s / plain PyTorch loop",
            f"{t['ratio']:.3f}",
            f"{t['fit_tokens_per_s']:,.0f} / {t['plain_tokens_per_s']:,.0f}",
            t["goal"],
        ),
        (
            "host memory: fit tokens/s, freed memory kept / glibc default",
            f"{h['ratio']:.3f}",
            f"{h['kept_minor_faults_per_step']:,.0f} / "
            f"{h['glibc_default_minor_faults_per_step']:,.0f} faults/step",
            h["goal"],
        ),
        (
            "host memory: fit peak RSS, kept / glibc default",
            f"{h['kept_peak_rss_mb'] / h['glibc_default_peak_rss_mb']:.3f}",
            f"{h['kept_peak_rss_mb']:,.0f} / {h['glibc_default_peak_rss_mb']:,.0f} MB",
            "figure",
        ),
        (
            "loader: peak RSS 2 GB store - 20 MB store (MB)",
            f"{ld['rss_difference_mb']:+.0f}",
            f"{ld['2GB']['sequences_per_s']:,.0f} vs {ld['20MB']['sequences_per_s']:,.0f} seq/s",
            ld["goal"],
        ),
        (
            "loss: peak RSS chunked (1024) / full logits (V 50,304, seq 2048)",
            f"{results['loss_memory']['ratio']:.3f}",
            f"{results['loss_memory']['chunked_1024_peak_rss_mb']:,.0f} / "
            f"{results['loss_memory']['plain_peak_rss_mb']:,.0f} MB",
            results["loss_memory"]["goal"],
        ),
        (
            "gpu: MFU pythia-160m / 410m (bf16, FSDP2, compile)",
            "-"
            if "skipped" in results["gpu"]
            else " / ".join(
                f"{results['gpu'][a].get('mfu', float('nan')):.2f}"
                for a in ("pythia-160m", "pythia-410m")
            ),
            "",
            results["gpu"].get("skipped", results["gpu"].get("goal", "")),
        ),
        (
            "gpu: CUDA host syncs in non-logging steps (160m / 410m)",
            "-"
            if "skipped" in results["gpu"]
            else " / ".join(
                str(results["gpu"][a].get("host_syncs_in_non_logging_steps"))
                for a in ("pythia-160m", "pythia-410m")
            ),
            "torch sync debug mode",
            "0",
        ),
    ]
    rows += prepare_bench.rows(results["prepare_parallel"])
    rows += breakdown.rows(results["step_breakdown"])
    rows += advise_bench.rows(results["advise"])
    rows += corpora_bench.rows(results["corpora"])
    rows += proxy_bench.rows(results["proxy_sweep"])
    print(f"\n{'benchmark':<52} {'figure':>12}  {'detail':<22} goal")
    for name, fig, detail, goal in rows:
        print(f"{name:<52} {fig:>12}  {detail:<22} {goal}")
    Path(args.out).write_text(json.dumps(results, indent=2))
    print(f"\nwritten {args.out}")


if __name__ == "__main__":
    main()
