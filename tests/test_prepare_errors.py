"""Bad data given to `midtrain prepare` (and a damaged store given to `fit`): exit code 2, one
stderr line naming the file (and line or byte where known) and the cause, and the existing
store byte-for-byte unchanged. The pattern of tests/test_bad_input.py."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from midtrain.cli import main
from tests.conftest import needs_non_root, read_only_directory
from tests.test_bad_input import run_bad, write_jsonl, write_yaml


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory, builtin_store: Path) -> Path:
    """An existing store that every bad run below points its output at."""
    d = tmp_path_factory.mktemp("existing")
    docs = write_jsonl(
        d / "docs.jsonl", [{"text": f"Document {i}: some words. " * 5} for i in range(100)]
    )
    config = {
        "output": str(d / "store"),
        "tokenizer": {"path": str(builtin_store / "tokenizer.json")},
        "domains": {"docs": {"source": {"path": str(docs)}, "val_fraction": 0.1}},
    }
    assert main(["prepare", "--config", str(write_yaml(d / "prepare.yaml", config))]) == 0
    return d / "store"


def _file(name: str, content: bytes) -> Callable[[Path], Path]:
    def make(tmp: Path) -> Path:
        (tmp / name).write_bytes(content)
        return tmp / name

    return make


def _source(make: Callable[[Path], Path]) -> Callable[[Path], dict[str, Any]]:
    return lambda tmp: {"domains": {"bad": {"source": {"path": str(make(tmp))}}}}


# id, config change (given the test's tmp dir), expected text ({tmp}: the tmp dir)
CASES: list[tuple[str, Callable[[Path], dict[str, Any]], str]] = [
    (
        "jsonl-malformed-line",
        _source(_file("m.jsonl", b'{"text": "a"}\n{"text": "b" "c"}\n{"text": "d"}\n')),
        "domains.bad.source: {tmp}/m.jsonl:2: malformed JSON line: Expecting ',' delimiter "
        "(column 14)",
    ),
    (
        "jsonl-truncated",
        _source(_file("t.jsonl", b'{"text": "a"}\n{"text": "b"}\n{"text": "tru')),
        "domains.bad.source: {tmp}/t.jsonl:3: malformed JSON line: Unterminated string starting "
        "at (column 10); the file looks truncated",
    ),
    (
        "json-array-malformed",
        _source(_file("a.json", b'[\n  {"text": "a"},\n  {"text": "b" "c"}\n]\n')),
        "domains.bad.source: {tmp}/a.json:3: malformed JSON: Expecting ',' delimiter (column 16)",
    ),
    (
        "txt-not-utf8",
        _source(_file("latin1.txt", "first line\ncaf\u00e9 au lait\n".encode("latin-1"))),
        "domains.bad.source: {tmp}/latin1.txt:2: not UTF-8: byte 0xe9 at offset 14 "
        "(line 2, column 4); convert the file to UTF-8",
    ),
    (
        "binary-file",
        _source(_file("image.txt", b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(range(256)))),
        "domains.bad.source: {tmp}/image.txt: a binary file (NUL byte at offset 8), not UTF-8 text",
    ),
    (
        "data-files-empty-list",
        lambda tmp: {"domains": {"bad": {"source": {"path": "json", "data_files": []}}}},
        "domains.bad.source.data_files: the list is empty; name at least one file",
    ),
    (
        "glob-matches-nothing",
        lambda tmp: {
            "domains": {"bad": {"source": {"path": "json", "data_files": f"{tmp}/none-*.jsonl"}}}
        },
        "domains.bad.source.data_files: no file matches {tmp}/none-*.jsonl",
    ),
    (
        "list-valued-template-field",
        _source(
            lambda tmp: write_jsonl(tmp / "l.jsonl", [{"text": "fine"}, {"text": ["a", "list"]}])
        ),
        "domains.bad: template field {text} holds a list in record 1; templates render strings "
        "and numbers: join the field in the source, or use `chat: text` for a list of turns",
    ),
    (
        "tokenizer-path-not-a-tokenizer",
        lambda tmp: {"tokenizer": {"path": str(_file("cfg.json", b'{"model_type": "gpt2"}')(tmp))}},
        "tokenizer.path: {tmp}/cfg.json is not a tokenizer.json (",
    ),
    (
        "bad-shard-spec",
        lambda tmp: {"--shard": "2of4"},
        "--shard: expected i/N (e.g. 0/4), got '2of4'",
    ),
    (
        "shard-index-out-of-range",
        lambda tmp: {"--shard": "4/4"},
        "--shard: i/N needs 0 <= i < N, got 4/4",
    ),
    (
        "merge-without-shards",
        lambda tmp: {
            "--merge": True,
            "domains": {
                "new": {"source": {"path": str(write_jsonl(tmp / "n.jsonl", [{"text": "x"}]))}}
            },
        },
        "domains.new: no shards in {store}/.shards/new; run `midtrain prepare --config <yaml> "
        "--shard i/N` for every i in 0..N-1 first",
    ),
    ("num-proc-zero", lambda tmp: {"num_proc": 0}, "num_proc: must be at least 1, got 0"),
    (
        "null-template-text",
        lambda tmp: {
            "domains": {
                "bad": {
                    "source": {"path": str(write_jsonl(tmp / "t.jsonl", [{"text": "x"}]))},
                    "text": None,
                }
            }
        },
        "template: `text` is null; give it, `prompt`/`response` or `chat`",
    ),
]


@pytest.mark.parametrize(("change", "expected"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_prepare_bad_data(
    change: Callable[[Path], dict[str, Any]],
    expected: str,
    store: Path,
    builtin_store: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture,
) -> None:
    config: dict[str, Any] = {
        "output": str(store),
        "tokenizer": {"path": str(builtin_store / "tokenizer.json")},
        "domains": {
            "docs": {"source": {"path": str(store.parent / "docs.jsonl")}, "val_fraction": 0.1}
        },
    }
    flags = []
    for key, value in change(tmp_path).items():
        if key.startswith("--"):
            flags += [key] if value is True else [key, value]
        elif key == "domains":
            config["domains"].update(value)
        else:
            config[key] = value
    yaml_path = write_yaml(tmp_path / "bad.yaml", config)
    line = run_bad(
        capsys, ["prepare", "--config", str(yaml_path), *flags], [store.parent, builtin_store]
    )
    assert expected.replace("{tmp}", str(tmp_path)).replace("{store}", str(store)) in line


@needs_non_root
def test_prepare_read_only_output(
    store: Path, builtin_store: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    with read_only_directory(tmp_path / "locked") as locked:
        config = write_yaml(
            tmp_path / "p.yaml",
            {
                "output": str(locked / "store"),
                "tokenizer": {"path": str(builtin_store / "tokenizer.json")},
                "domains": {"docs": {"source": {"path": str(store.parent / "docs.jsonl")}}},
            },
        )
        line = run_bad(capsys, ["prepare", "--config", str(config)], [locked, store.parent])
        assert f"output: {locked} is not writable" in line


def test_fit_refuses_an_odd_length_tokens_file(
    store: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    damaged = tmp_path / "damaged"
    shutil.copytree(store, damaged)
    tokens = damaged / "docs" / "train.tokens"
    with tokens.open("r+b") as f:
        f.truncate(tokens.stat().st_size - 1)
    config = write_yaml(
        tmp_path / "fit.yaml",
        {
            "model": {
                "arch": "tiny",
                "model_config": {"n_layer": 1, "n_embd": 32, "n_head": 2, "block_size": 64},
            },
            "data": {
                "class_path": "midtrain.MixtureDataModule",
                "init_args": {"store": str(damaged), "seq_len": 32, "micro_batch_size": 2},
            },
            "trainer": {
                "accelerator": "cpu",
                "devices": 1,
                "max_steps": 2,
                "logger": False,
                "default_root_dir": str(tmp_path / "run"),
                "enable_progress_bar": False,
            },
        },
    )
    line = run_bad(capsys, ["fit", "--config", str(config)], [damaged])
    assert line.endswith(
        f"{tokens}: {tokens.stat().st_size:,} bytes is not a whole number of "
        "uint16 tokens (odd byte length): the file is damaged; re-run "
        "`midtrain prepare`"
    )
