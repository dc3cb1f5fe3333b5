"""Shared fixtures: small real token stores, built once per test session."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from midtrain.cli.quiet import quiet_lightning

# Tests never touch the network: the hub is unreachable here and must not be needed.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# Root may write into a read-only directory, so tests of that refusal only mean something for
# other users (CI here runs as root: they skip with this reason).
needs_non_root = pytest.mark.skipif(
    os.geteuid() == 0, reason="root writes into read-only directories"
)


@contextlib.contextmanager
def read_only_directory(path: Path) -> Iterator[Path]:
    """A new directory at ``path`` that cannot be written to, for the length of the block."""
    path.mkdir()
    path.chmod(0o555)
    try:
        yield path
    finally:
        path.chmod(0o755)


SHARED = Path(
    os.environ.get("MIDTRAIN_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data")
)
needs_shared = pytest.mark.skipif(
    not SHARED.is_dir(), reason=f"real sample data not found at {SHARED} (set MIDTRAIN_SHARED_DATA)"
)


def prepare_store(output: Path, domains: dict, vocab_size: int = 1024) -> Path:
    from midtrain.data.prepare import (
        DomainConfig,
        PrepareConfig,
        TokenizerConfig,
        TrainTokenizerConfig,
        prepare,
    )

    config = PrepareConfig(
        output=str(output),
        domains={name: DomainConfig(**d) for name, d in domains.items()},
        tokenizer=TokenizerConfig(
            train=TrainTokenizerConfig(vocab_size=vocab_size, sample_docs=300)
        ),
    )
    return prepare(config)


SHARED_DOMAINS = {
    "c4": {"source": {"path": str(SHARED / "general/c4_demo.jsonl")}, "val_fraction": 0.1},
    "code": {
        "source": {"path": str(SHARED / "code/cpython311_stdlib.jsonl")},
        "max_docs": 120,
        "val_fraction": 0.1,
    },
    "gsm8k": {
        "source": {"path": str(SHARED / "math/gsm8k_train.jsonl")},
        "max_docs": 1500,
        "prompt": "Question: {question}\nAnswer: ",
        "response": "{answer}",
        "val_fraction": 0.1,
    },
}

BUILTIN_DOMAINS = {
    "prose": {"source": {"builtin": "python-docs"}, "max_docs": 150, "val_fraction": 0.1},
    "code": {"source": {"builtin": "python-stdlib"}, "max_docs": 60, "val_fraction": 0.1},
    "math": {
        "source": {"builtin": "arithmetic", "num_problems": 1500},
        "prompt": "Question: {question}\nAnswer: ",
        "response": "{answer}",
        "mask_prompt": False,
        "val_fraction": 0.1,
    },
}


@pytest.fixture(scope="session")
def shared_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """C4 sample, CPython source and GSM8K (prompt-masked) from ../shared/data."""
    if not SHARED.is_dir():
        pytest.skip(f"real sample data not found at {SHARED}")
    return prepare_store(tmp_path_factory.mktemp("shared") / "store", SHARED_DOMAINS)


@pytest.fixture(scope="session")
def builtin_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The built-in offline data (needs nothing outside the Python installation)."""
    return prepare_store(tmp_path_factory.mktemp("builtin") / "store", BUILTIN_DOMAINS, 512)


def pytest_configure(config: pytest.Config) -> None:
    # In-process tests drive Lightning as the `midtrain` command does (resume, fork, validate):
    # the same messages are noise here, filtered by the one list that says why.
    quiet_lightning("validate", fork=True)
