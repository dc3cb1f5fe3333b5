"""`midtrain advise` wall time (`tox -e bench`, or alone with `python -m tests.benchmarks.advise`):
the advisor's whole answer (documents sampled, features, 200 bootstrap resamples per target) for
a grid of 9 candidates and 2 targets on the built-in store (~1 M tokens), by stage: the answer
should take seconds, so a user can try candidates as fast as they think of them. Median of
three runs. Figures, not assertions."""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

from tests.benchmarks import print_figures

BRANCHES = {
    "code": {"grid": {"domain": "code", "start": [10, 50], "weight": [0.2, 0.5]}},
    "math": {"grid": {"domain": "math", "start": [10, 50], "weight": [0.2, 0.5]}},
}


def bench_advise(store: Path, repeats: int = 3) -> dict:
    from midtrain.data.store import Store
    from midtrain.study import advise

    s = Store(store)
    tokens = sum(s.domain(d).train.num_tokens for d in s.domain_names)
    targets = {"code": {"target": "code"}, "math": {"target": "math"}}
    seconds = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        advice = advise(str(store), {"prose": 1.0}, BRANCHES, targets, 100, bootstrap=200)
        seconds.append(time.perf_counter() - t0)
    return {
        "store_tokens": tokens,
        "candidates": len(advice.for_target("code")),
        "targets": len(targets),
        "bootstrap": 200,
        "seconds": statistics.median(seconds),
        "goal": "seconds",
    }


def rows(r: dict) -> list[tuple[str, str, str, str]]:
    """Lines for the table of tests/benchmarks/run.py."""
    return [
        (
            "advise: seconds for candidates x targets (200 resamples)",
            f"{r['seconds']:.2f}",
            f"{r['candidates']} x {r['targets']}, {r['store_tokens']:,} tokens",
            r["goal"],
        )
    ]


def main() -> None:
    from tests.benchmarks.run import build_store

    with tempfile.TemporaryDirectory() as tmp:
        result = bench_advise(build_store(Path(tmp)))
    print_figures(rows(result), result)


if __name__ == "__main__":
    main()
