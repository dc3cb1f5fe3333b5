"""Where a training step's time goes at the LitGPT anchor's issue shape (4 layers, d=256,
4 heads, seq 256, batch 16, vocab 8192, fp32), and what `torch.compile` changes: the reason
behind the compile figures of `tox -e bench-anchor`. Part of `tox -e bench`; alone:

    python -m tests.benchmarks.breakdown

A plain loop over midtrain's own pieces (``GPT.features``, ``chunked_cross_entropy``, clipping,
fused AdamW, freed host memory kept as ``midtrain.train.host`` does), timed part by part; the step's
matmul FLOPs against this machine's own sgemm rate; then eager vs the compiled trunk vs trunk
and loss compiled together, interleaved.
Figures, not assertions.
"""

from __future__ import annotations

import json
import statistics
import sys
import time

import torch

from tests.benchmarks import print_figures

SHAPE = dict(n_layer=4, n_embd=256, n_head=4, seq_len=256, batch=16, vocab=8192)


def _model():  # type: ignore[no-untyped-def]
    from midtrain.model.config import ModelConfig
    from midtrain.model.gpt import GPT

    torch.manual_seed(0)
    s = SHAPE
    return GPT(
        ModelConfig(
            n_layer=s["n_layer"],
            n_embd=s["n_embd"],
            n_head=s["n_head"],
            block_size=s["seq_len"],
            vocab_size=s["vocab"],
        )
    )


def _batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, SHAPE["vocab"], (SHAPE["batch"], SHAPE["seq_len"] + 1), generator=g)
    return x[:, :-1], x[:, 1:], torch.ones(SHAPE["batch"], SHAPE["seq_len"])


def step_parts(steps: int = 20, warmup: int = 5) -> dict[str, float]:
    """Median milliseconds of each part of an eager step."""
    from midtrain.model.loss import chunked_cross_entropy

    model, (inp, tgt, mask) = _model(), _batch()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4, fused=True)
    parts: dict[str, list[float]] = {
        k: []
        for k in (
            "trunk forward",
            "loss (forward, with its gradients)",
            "backward (trunk)",
            "clip",
            "optimizer",
        )
    }
    for i in range(steps + warmup):
        t = [time.perf_counter()]
        features = model.features(inp)
        t.append(time.perf_counter())
        loss = chunked_cross_entropy(features, model.lm_head.weight, tgt, mask).sum() / mask.sum()
        t.append(time.perf_counter())
        loss.backward()
        t.append(time.perf_counter())
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        t.append(time.perf_counter())
        opt.step()
        opt.zero_grad(set_to_none=True)
        t.append(time.perf_counter())
        if i >= warmup:
            for k, a, b in zip(parts, t, t[1:], strict=False):
                parts[k].append((b - a) * 1e3)
    return {k: statistics.median(v) for k, v in parts.items()}


def step_flops() -> float:
    """Matmul FLOPs of one training step (forward + backward): linear layers, attention
    (causal half not subtracted) and the head."""
    s = SHAPE
    tokens, d, L = s["batch"] * s["seq_len"], s["n_embd"], s["n_layer"]
    linear = 12 * d * d * L  # qkv 3d^2, proj d^2, mlp 8d^2
    attention = 2 * 2 * s["seq_len"] * d * L  # QK^T and PV per token
    head = d * s["vocab"]
    return 3 * 2 * tokens * (linear + head) + 3 * tokens * attention


def sgemm_gflops(n: int = 2048, repeats: int = 10) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    for _ in range(3):
        a @ b
    t0 = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * n**3 * repeats / (time.perf_counter() - t0) / 1e9


def compile_modes(steps: int = 10, warmup: int = 3, rounds: int = 3) -> dict[str, float]:
    """Median step milliseconds of eager, the compiled trunk (what ``model.compile`` does) and
    trunk + chunked loss compiled as one function; rounds interleaved."""
    from midtrain.model.loss import chunked_cross_entropy

    inp, tgt, mask = _batch()
    setups = {}
    for mode in ("eager", "compiled trunk", "compiled trunk + loss"):
        model = _model()

        def loss_fn(model=model) -> torch.Tensor:  # type: ignore[no-untyped-def]
            f = model.features(inp)
            return chunked_cross_entropy(f, model.lm_head.weight, tgt, mask).sum() / mask.sum()

        if mode == "compiled trunk":
            model.features = torch.compile(model.features)
        if mode == "compiled trunk + loss":
            loss_fn = torch.compile(loss_fn)
        setups[mode] = (model, loss_fn, torch.optim.AdamW(model.parameters(), lr=3e-4, fused=True))
    times: dict[str, list[float]] = {k: [] for k in setups}
    for r in range(rounds):
        for mode, (model, loss_fn, opt) in setups.items():
            for i in range(steps + (warmup if r == 0 else 1)):
                t0 = time.perf_counter()
                loss_fn().backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                opt.step()
                opt.zero_grad(set_to_none=True)
                if i >= (warmup if r == 0 else 1):
                    times[mode].append((time.perf_counter() - t0) * 1e3)
    return {k: statistics.median(v) for k, v in times.items()}


def bench_breakdown() -> dict:
    parts = step_parts()
    total = sum(parts.values())
    flops = step_flops()
    peak = sgemm_gflops()
    modes = compile_modes()
    return {
        "shape": SHAPE,
        "threads": torch.get_num_threads(),
        "parts_ms": parts,
        "step_ms": total,
        "step_matmul_gflop": flops / 1e9,
        "sgemm_gflops": peak,
        "step_ms_at_sgemm_rate": flops / 1e9 / peak * 1e3,
        "matmul_share_at_sgemm_rate": flops / 1e9 / peak * 1e3 / total,
        "compile_step_ms": modes,
        "compiled_trunk_over_eager": modes["eager"] / modes["compiled trunk"],
        "compiled_trunk_and_loss_over_eager": modes["eager"] / modes["compiled trunk + loss"],
    }


def in_fresh_process() -> dict:
    """``bench_breakdown`` in its own process: no thread setting or heap left by other
    benchmarks."""
    import subprocess
    from pathlib import Path

    proc = subprocess.run(
        [sys.executable, "-m", "tests.benchmarks.breakdown", "--json"],
        capture_output=True,
        text=True,
        check=True,
        cwd=Path(__file__).resolve().parents[2],
    )
    return json.loads(proc.stdout)


def rows(r: dict) -> list[tuple[str, str, str, str]]:
    """Lines for the table of tests/benchmarks/run.py."""
    parts = ", ".join(f"{k.split(' ')[0]} {v:.0f}" for k, v in r["parts_ms"].items())
    return [
        (
            "step (issue shape, eager): ms; matmuls at sgemm rate",
            f"{r['step_ms']:.0f}",
            f"{r['step_ms_at_sgemm_rate']:.0f} ms ({r['matmul_share_at_sgemm_rate']:.0%}); {parts}",
            "figure",
        ),
        (
            "step: compiled trunk / eager (speed)",
            f"{r['compiled_trunk_over_eager']:.3f}",
            f"trunk+loss compiled: {r['compiled_trunk_and_loss_over_eager']:.3f}",
            "figure",
        ),
    ]


def main() -> None:
    from midtrain.train.host import keep_freed_memory

    keep_freed_memory()  # as midtrain's Trainer does on the CPU: the step measured is fit's
    result = bench_breakdown()
    if "--json" in sys.argv[1:]:
        print(json.dumps(result))
        return
    print_figures(rows(result), result)


if __name__ == "__main__":
    main()
