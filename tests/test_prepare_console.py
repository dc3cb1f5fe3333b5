"""What `midtrain prepare` prints, read from a real run's console: progress bars that count
documents and tokens, and the closing summary (also in <store>/prepare-summary.json)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import yaml

from midtrain.data.prepare import SUMMARY
from midtrain.data.store import Store

ROOT = Path(__file__).resolve().parents[1]


def _run(tmp: Path, *extra: str) -> subprocess.CompletedProcess:
    src = tmp / "docs.jsonl"
    if not src.exists():  # rewritten, it would count as a changed source
        src.write_text("".join(json.dumps({"text": f"doc {i} " * 30}) + "\n" for i in range(90)))
    config = tmp / "prepare.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "output": str(tmp / "store"),
                "batch_size": 20,
                "tokenizer": {"train": {"vocab_size": 300, "sample_docs": 50}},
                "domains": {
                    "web": {"source": {"path": str(src)}, "val_fraction": 0.1},  # length: known
                    "math": {  # length not known: counting up
                        "source": {"builtin": "arithmetic", "num_problems": 41},
                        "text": "{question} {answer}",
                    },
                },
            },
            sort_keys=False,
        )
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-m", "midtrain", "prepare", "--config", str(config), *extra],
        capture_output=True,
        text=True,
        env=env,
        check=True,
    )


def _final_bar(stderr: str, name: str) -> str:
    bars = [b for b in re.split(r"[\r\n]", stderr) if b.startswith(f"prepare {name}")]
    assert bars, stderr
    return bars[-1]


def test_console_counts_docs_and_tokens_and_ends_with_the_summary(tmp_path: Path) -> None:
    out = _run(tmp_path, "--num_proc", "2")
    store = Store(tmp_path / "store")
    for name in ("web", "math"):
        d = store.domain(name)
        docs = d.train.num_docs + d.val.num_docs
        tokens = d.train.num_tokens + d.val.num_tokens
        bar = _final_bar(out.stderr, name)
        assert f"{tokens:,} tokens" in bar, bar
        assert (f"{docs}/{docs}" if name == "web" else f"{docs} docs") in bar, bar
    lines = out.stdout.splitlines()
    summary = json.loads((tmp_path / "store" / SUMMARY).read_text())
    assert summary["domains"]["web"]["val"]["docs"] == 9 == store.domain("web").val.num_docs
    assert summary["tokens_built"] == summary["tokens"] > 0 and summary["wall_seconds"] > 0
    built = next(line for line in lines if line.startswith("built "))
    assert f"{summary['tokens']:,} tokens in" in built and "tokens/s" in built
    assert f"summary: {tmp_path / 'store' / SUMMARY}" in lines
    assert f"next: midtrain fit --config <pretrain.yaml> --data.store {tmp_path / 'store'}" in lines
    assert lines[-3].split()[:2] == ["domain", "state"] and lines[-1].split()[:2] == [
        "math",
        "built",
    ]

    again = _run(tmp_path)  # all reused: says so, and leaves the summary alone
    assert "nothing to build: every domain reused" in again.stdout
    assert json.loads((tmp_path / "store" / SUMMARY).read_text()) == summary
