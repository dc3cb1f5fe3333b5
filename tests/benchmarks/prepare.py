"""`midtrain prepare` throughput, side by side in one run (`tox -e bench`, or alone with
`python -m tests.benchmarks.prepare`): prepare on 1 process / a bare single-threaded
`encode_batch` of the same texts, and prepare on 2 processes / prepare on 1 process, next to
what 2 processes of bare `encode_batch` give on this machine (its ceiling). Figures, not
assertions; the 2-process store is also compared byte for byte with the 1-process one.

The corpus is the standard library's sources (~600 files of real code) written twice over
(~1,200 documents, ~5.5 M tokens, ~5 s on one core): long enough that the fixed start-up of a
parallel run (forking the workers, merging, ~0.1 s) is small next to the work, as it is for a
real corpus. Five interleaved repeats; each ratio is taken within a repeat, then the median.
Records are dealt to the workers in batches of 8 (``batch_size``), so the two workers' shares
stay within a few percent of each other despite file sizes from 0 to 170 KB.
With ../shared/data present it also measures one core's rate on the C4 sample (web text), the
figure docs/data.md turns into the time to prepare the paper's corpus."""

from __future__ import annotations

import filecmp
import json
import multiprocessing
import os
import statistics
import tempfile
import time
from pathlib import Path

from tests.benchmarks import print_figures

# One process per core is the unit measured: the tokenizer's own thread pool stays off.
os.environ["TOKENIZERS_PARALLELISM"] = "false"


def _same_tree(a: Path, b: Path) -> bool:
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    return files == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file()) and all(
        filecmp.cmp(a / f, b / f, shallow=False) for f in files
    )


_TEXTS: list[str] = []
_TOKENIZER: list = []


BATCH = 8  # records per batch dealt to a worker
COPIES = 2  # the corpus written this many times over
PAPER_TOKENS = 61_035 * 1024 * 2048  # the paper's pretraining corpus (steps x batch x seq)


def _encode_share(index: int) -> int:
    """Bare encode_batch of every other batch of texts (a forked worker's half), dealt as
    prepare deals them."""
    texts, tok = _TEXTS, _TOKENIZER[0]
    return sum(
        len(e.ids) + 1
        for i in range(index * BATCH, len(texts), 2 * BATCH)
        for e in tok.encode_batch_fast(texts[i : i + BATCH], add_special_tokens=False)
    )


def machine_ceiling(texts: list[str], tok: object) -> float:
    """What 2 processes give on this machine right now: a bare encode_batch of the texts in
    2 forked processes vs 1 (about 2.0 on 2 idle cores; less when other jobs hold the CPUs)."""
    _TEXTS[:], _TOKENIZER[:] = texts, [tok]
    t0 = time.perf_counter()
    _encode_share(0), _encode_share(1)
    one = time.perf_counter() - t0
    with multiprocessing.get_context("fork").Pool(2) as pool:
        t0 = time.perf_counter()
        pool.map(_encode_share, [0, 1])
        two = time.perf_counter() - t0
    return one / two


def bench_prepare_parallel(root: Path, repeats: int = 5) -> dict:
    """The standard library's sources (~10 MB of real code, ~600 files, written ``COPIES``
    times) as a jsonl domain, encoded with a byte-level BPE of 8192 tokens trained on a
    sample of it."""
    from midtrain.data import sources
    from midtrain.data.builtin import python_stdlib
    from midtrain.data.prepare import DomainConfig, PrepareConfig, TokenizerConfig, prepare
    from midtrain.data.tokenizer import train_bpe

    root.mkdir(parents=True, exist_ok=True)
    texts = [r["text"] for r in python_stdlib()] * COPIES
    src = root / "stdlib.jsonl"
    src.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    tok = train_bpe(texts[: len(texts) // COPIES : 5], 8192)
    tok_path = root / "tokenizer.json"
    tok.save(str(tok_path))

    def run(num_proc: int, i: int) -> tuple[float, int, Path]:
        out = root / f"store-{num_proc}-{i}"
        sources._OPENED.clear()  # open the source as a fresh `midtrain prepare` would
        t0 = time.perf_counter()
        prepare(
            PrepareConfig(
                output=str(out),
                num_proc=num_proc,
                batch_size=BATCH,
                domains={"code": DomainConfig(source={"path": str(src)})},
                tokenizer=TokenizerConfig(path=str(tok_path)),
            )
        )
        seconds = time.perf_counter() - t0
        splits = json.loads((out / "code" / "manifest.json").read_text())["splits"]
        return seconds, sum(s["tokens"] for s in splits.values()), out

    run(1, -1)  # warm-up: datasets converts the jsonl to its Arrow cache once, on first use
    rows = []
    load = [os.getloadavg()[0]]
    for i in range(repeats):  # interleaved, so drift hits every variant alike
        t0 = time.perf_counter()
        encoded = tok.encode_batch_fast(texts, add_special_tokens=False)
        n = sum(len(e.ids) + 1 for e in encoded)
        bare = n / (time.perf_counter() - t0)
        s1, n1, out1 = run(1, i)
        s2, n2, out2 = run(2, i)
        rows.append(
            {
                "encode_batch": bare,
                "prepare_1proc": n1 / s1,
                "prepare_2proc": n2 / s2,
                "machine_2proc_encode_speedup": machine_ceiling(texts, tok),
                "byte_identical": _same_tree(out1, out2),
            }
        )
        load.append(os.getloadavg()[0])

    def median(f):  # type: ignore[no-untyped-def]
        # of each repeat's own figure: the runs of one repeat saw the same moment of the machine
        return statistics.median(f(r) for r in rows)

    speedup = median(lambda r: r["prepare_2proc"] / r["prepare_1proc"])
    return {
        "encode_batch_tokens_per_s": median(lambda r: r["encode_batch"]),
        "prepare_1proc_tokens_per_s": median(lambda r: r["prepare_1proc"]),
        "prepare_2proc_tokens_per_s": median(lambda r: r["prepare_2proc"]),
        "ratio_1proc_vs_encode_batch": median(lambda r: r["prepare_1proc"] / r["encode_batch"]),
        "speedup_2proc": speedup,
        "machine_2proc_encode_speedup": median(lambda r: r["machine_2proc_encode_speedup"]),
        "speedup_2proc_of_machine": median(
            lambda r: r["prepare_2proc"] / r["prepare_1proc"] / r["machine_2proc_encode_speedup"]
        ),
        "byte_identical": all(r["byte_identical"] for r in rows),
        "per_repeat": rows,
        "tokens": n1,
        "documents": len(texts),
        "batch_size": BATCH,
        "cpus": os.cpu_count(),
        "load_average_1min": load,
        "c4_per_core": bench_c4_per_core(root / "c4"),
        "goal": "1 proc >= 0.9 x encode_batch; 2 procs >= 1.7 x 1 proc on 2 cores",
    }


def bench_c4_per_core(root: Path, repeats: int = 3) -> dict:
    """One prepare process's tokens/s on the C4 sample of ../shared/data (web text, what the
    paper pretrains on), with a byte-level BPE of 8192 tokens trained on it; and what that
    rate means for the paper's ~128 B tokens. Skipped without the sample."""
    from midtrain.data import sources
    from midtrain.data.prepare import DomainConfig, PrepareConfig, TokenizerConfig, prepare
    from midtrain.data.tokenizer import train_bpe
    from tests.conftest import SHARED

    c4 = SHARED / "general" / "c4_demo.jsonl"
    if not c4.is_file():
        return {"skipped": f"C4 sample not found at {c4}"}
    root.mkdir(parents=True, exist_ok=True)
    texts = [json.loads(line)["text"] for line in c4.read_text().splitlines() if line.strip()]
    src = root / "c4.jsonl"  # written 10 times over: a few seconds of work per run
    src.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts) * 10)
    tok_path = root / "tokenizer.json"
    train_bpe(texts, 8192).save(str(tok_path))
    rates = []
    for i in range(repeats):
        sources._OPENED.clear()
        out = root / f"store-{i}"
        t0 = time.perf_counter()
        prepare(
            PrepareConfig(
                output=str(out),
                domains={"web": DomainConfig(source={"path": str(src)})},
                tokenizer=TokenizerConfig(path=str(tok_path)),
            )
        )
        seconds = time.perf_counter() - t0
        splits = json.loads((out / "web" / "manifest.json").read_text())["splits"]
        rates.append(sum(s["tokens"] for s in splits.values()) / seconds)
    rate = statistics.median(rates)
    return {
        "tokens_per_s": rate,
        "runs": rates,
        "documents": 10 * len(texts),
        "paper_tokens": PAPER_TOKENS,
        "paper_core_hours": PAPER_TOKENS / rate / 3600,
        "note": "includes each run's start-up (opening the jsonl, writing, hashing)",
    }


def rows(r: dict) -> list[tuple[str, str, str, str]]:
    """Lines for the table of tests/benchmarks/run.py."""
    return [
        (
            "data prep: prepare 1 proc / bare encode_batch",
            f"{r['ratio_1proc_vs_encode_batch']:.3f}",
            f"{r['prepare_1proc_tokens_per_s']:,.0f} / {r['encode_batch_tokens_per_s']:,.0f}",
            ">= 0.9",
        ),
        (
            "data prep: prepare 2 procs / 1 proc (speed-up)",
            f"{r['speedup_2proc']:.2f}",
            f"byte-identical: {r['byte_identical']}",
            ">= 1.7 on 2 cores",
        ),
        (
            "data prep: bare encode_batch 2 procs / 1 (machine)",
            f"{r['machine_2proc_encode_speedup']:.2f}",
            f"ceiling; load avg <= {max(r['load_average_1min']):.1f}",
            "2.0 on 2 idle cores",
        ),
        (
            "data prep: prepare 2 procs / machine's 2-proc ceiling",
            f"{r['speedup_2proc_of_machine']:.2f}",
            "how much of it prepare gets",
            "~1.0",
        ),
        (
            "data prep: C4 sample, 1 proc, tokens/s (per core)",
            "-" if "skipped" in r["c4_per_core"] else f"{r['c4_per_core']['tokens_per_s']:,.0f}",
            r["c4_per_core"].get("skipped", "")
            or f"paper's 128 B tokens: {r['c4_per_core']['paper_core_hours']:,.0f} core-hours",
            "figure",
        ),
    ]


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        result = bench_prepare_parallel(Path(tmp))
    print_figures(rows(result), result)


if __name__ == "__main__":
    main()
