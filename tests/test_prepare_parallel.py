"""`midtrain prepare` at scale and in detail: num_proc and --shard/--merge give the very bytes
of a 1-process build; --verify catches a flipped byte; whitespace-only documents are skipped
and counted; a literal EOS string is text; text files lose their BOM and CRLF; a new kind of
source is one registered class."""

from __future__ import annotations

import filecmp
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from tokenizers import Tokenizer

from midtrain.cli import main
from midtrain.data.prepare import SUMMARY
from midtrain.data.store import Store
from tests.conftest import SHARED, needs_shared

SHARED_CONFIG: dict[str, Any] = {
    "web": {"source": {"path": str(SHARED / "general/c4_demo.jsonl")}, "val_fraction": 0.1},
    "code": {
        "source": {"path": str(SHARED / "code/cpython311_stdlib.jsonl")},
        "max_tokens": 60_000,
    },  # capped inside a batch of a later shard
    "gsm8k": {
        "source": {"path": str(SHARED / "math/gsm8k_train.jsonl")},
        "max_docs": 333,
        "prompt": "Question: {question}\nAnswer: ",
        "response": "{answer}",
    },
    "lines": {"source": {"path": "text", "data_files": [str(SHARED / "general/pg11.txt")]}},
}
BUILTIN_CONFIG: dict[str, Any] = {  # iterable (generator) sources: shards skip others' batches
    "math": {
        "source": {"builtin": "arithmetic", "num_problems": 700},
        "prompt": "Q: {question}\nA: ",
        "response": "{answer}",
        "val_fraction": 0.1,
    },
    "code": {"source": {"builtin": "python-stdlib", "max_docs": 40}, "max_tokens": 30_000},
}


def _files(root: Path) -> list[Path]:
    return sorted(p.relative_to(root) for p in root.rglob("*") if p.is_file())


def _counts(root: Path) -> dict[str, Any]:
    return json.loads((root / SUMMARY).read_text())["domains"]


def assert_same_bytes(a: Path, b: Path) -> None:
    assert _files(a) == _files(b)
    # the run's summary holds its wall time: every other file is the same, byte for byte,
    # and the summaries agree on every count
    different = [
        str(f) for f in _files(a) if f != Path(SUMMARY) and not filecmp.cmp(a / f, b / f, False)
    ]
    assert different == []
    strip = {"seconds"}
    assert [{k: v for k, v in d.items() if k not in strip} for d in _counts(a).values()] == [
        {k: v for k, v in d.items() if k not in strip} for d in _counts(b).values()
    ]


def _prepare(tmp: Path, domains: dict[str, Any], output: str, *extra: str) -> int:
    config = tmp / "prepare.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "output": str(tmp / "one"),
                "batch_size": 37,
                "domains": domains,
                "tokenizer": {"train": {"vocab_size": 400, "sample_docs": 100}},
            }
        )
    )
    return main(["prepare", "--config", str(config), "--output", str(tmp / output), *extra])


def _parallel_builds_match(tmp: Path, domains: dict[str, Any]) -> None:
    assert _prepare(tmp, domains, "one") == 0
    assert _prepare(tmp, domains, "two", "--num_proc", "2") == 0
    assert_same_bytes(tmp / "one", tmp / "two")
    # three nodes: the tokenizer is trained once, then each node encodes its shard
    assert _prepare(tmp, domains, "nodes", "--shard", "0/3") == 2  # not before the tokenizer
    assert _prepare(tmp, domains, "nodes", "--tokenizer_only") == 0
    for i in (2, 0, 1):
        assert _prepare(tmp, domains, "nodes", "--shard", f"{i}/3") == 0
    assert _prepare(tmp, domains, "nodes", "--merge") == 0
    assert_same_bytes(tmp / "one", tmp / "nodes")  # the shard folder is gone too
    for name in domains:  # the caps really cut inside the source
        manifest = Store(tmp / "one").domain(name).manifest
        assert manifest["splits"]["train"]["docs"] > 0


@needs_shared
def test_num_proc_and_shards_are_byte_identical_on_real_data(tmp_path: Path) -> None:
    _parallel_builds_match(tmp_path, SHARED_CONFIG)
    store = Store(tmp_path / "one")
    assert store.domain("gsm8k").train.num_docs + store.domain("gsm8k").val.num_docs == 333
    code = store.domain("code")
    assert code.train.num_tokens + code.val.num_tokens >= 60_000
    assert store.domain("lines").manifest["skipped_empty"] > 0  # blank lines of the book


def test_num_proc_and_shards_are_byte_identical_on_builtin_sources(tmp_path: Path) -> None:
    _parallel_builds_match(tmp_path, BUILTIN_CONFIG)


def test_merge_refuses_an_incomplete_shard_set(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    domains = {"math": BUILTIN_CONFIG["math"]}
    assert _prepare(tmp_path, domains, "nodes", "--tokenizer_only") == 0
    assert _prepare(tmp_path, domains, "nodes", "--shard", "1/2") == 0
    capsys.readouterr()
    assert _prepare(tmp_path, domains, "nodes", "--merge") == 2
    err = capsys.readouterr().err.strip()
    assert err.endswith(
        "shard(s) 0 of 2 missing; run `midtrain prepare --config <yaml> "
        "--shard i/N` for every i in 0..N-1 first"
    )
    assert not (tmp_path / "nodes" / "store.json").exists()


def _small_store(tmp: Path, texts: list[str], **domain: Any) -> Path:
    src = tmp / "docs.jsonl"
    src.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    config = tmp / "small.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "output": str(tmp / "store"),
                "tokenizer": {"train": {"vocab_size": 300}},
                "domains": {"d": {"source": {"path": str(src)}, "val_fraction": 0.0, **domain}},
            }
        )
    )
    assert main(["prepare", "--config", str(config)]) == 0
    return tmp / "store"


def test_verify_detects_a_flipped_byte(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    root = _small_store(tmp_path, [f"document {i} with some text" for i in range(50)])
    assert main(["prepare", "--verify", str(root)]) == 0
    tokens = root / "d" / "train.tokens"
    data = bytearray(tokens.read_bytes())
    data[10] ^= 0x01  # same size: only the content hash can tell
    tokens.write_bytes(bytes(data))
    capsys.readouterr()
    assert main(["prepare", "--verify", str(root)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (
        f"midtrain prepare: error: 1 of 1 domain(s) damaged; first: {tokens}: content "
        "differs from its manifest (sha256); re-run `midtrain prepare`"
    )


@pytest.mark.parametrize("cut", [1, 2], ids=["odd-length", "truncated"])
def test_store_is_checked_against_its_manifest_at_open(tmp_path: Path, cut: int) -> None:
    from midtrain.errors import MidtrainError

    root = _small_store(tmp_path, [f"document {i} with some text" for i in range(50)])
    tokens = root / "d" / "train.tokens"
    size = tokens.stat().st_size
    with tokens.open("r+b") as f:
        f.truncate(size - cut)
    what = "odd byte length" if cut == 1 else f"but its manifest says {size:,}"
    with pytest.raises(MidtrainError, match=what) as info:
        Store(root).domain("d")
    assert str(info.value).startswith(f"{tokens}: ")
    assert str(info.value).endswith("re-run `midtrain prepare`")


def test_whitespace_only_documents_are_skipped_and_counted(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    texts = ["first document", "", "   \n\t  ", "second document", "\n", "third"]
    root = _small_store(tmp_path, texts)
    out = capsys.readouterr().out
    d = Store(root).domain("d")
    tok = Tokenizer.from_file(str(root / "tokenizer.json"))
    assert [tok.decode(d.train.document(j).tolist()) for j in range(d.train.num_docs)] == [
        "first document",
        "second document",
        "third",
    ]
    assert d.manifest["skipped_empty"] == 3
    assert "skipped empty" in out and out.rstrip().endswith("3")


def test_literal_eos_in_text_is_text(tmp_path: Path) -> None:
    texts = ["a story <|endoftext|> goes on", "<|endoftext|>", "plain"]
    root = _small_store(tmp_path, texts)
    store = Store(root)
    d = store.domain("d").train
    tok = Tokenizer.from_file(str(root / "tokenizer.json"))
    assert d.num_docs == 3  # the EOS string did not split or end a document
    for j, text in enumerate(texts):
        ids = d.document(j)
        assert store.eos_id not in ids.tolist()  # only the real document ends are EOS
        assert tok.decode(ids.tolist(), skip_special_tokens=False) == text
    assert int((np.asarray(d.tokens) == store.eos_id).sum()) == 3


def test_text_files_drop_bom_and_crlf(tmp_path: Path) -> None:
    book = tmp_path / "book.txt"
    book.write_bytes("\ufeffChapter 1\r\nIt was a dark night.\r\n\r\nThe end.\r\n".encode())
    jsonl = tmp_path / "rec.jsonl"
    jsonl.write_text(json.dumps({"text": "kept\r\nas is"}) + "\n")
    config = tmp_path / "p.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "output": str(tmp_path / "store"),
                "tokenizer": {"train": {"vocab_size": 300}},
                "domains": {
                    "doc": {
                        "source": {
                            "path": "text",
                            "data_files": [str(book)],
                            "sample_by": "document",
                        },
                        "val_fraction": 0.0,
                    },
                    "lines": {"source": {"path": str(book)}, "val_fraction": 0.0},
                    "json": {"source": {"path": str(jsonl)}, "val_fraction": 0.0},
                },
            }
        )
    )
    assert main(["prepare", "--config", str(config)]) == 0
    store = Store(tmp_path / "store")
    tok = Tokenizer.from_file(str(store.tokenizer_path))

    def docs(name: str) -> list[str]:
        s = store.domain(name).train
        return [tok.decode(s.document(j).tolist()) for j in range(s.num_docs)]

    assert docs("doc") == ["Chapter 1\nIt was a dark night.\n\nThe end.\n"]
    assert docs("lines") == ["Chapter 1", "It was a dark night.", "The end."]
    assert docs("json") == ["kept\r\nas is"]  # a JSON string is content: stored as written
    assert store.domain("lines").manifest["skipped_empty"] == 1


class CountingSource:
    """A new kind of source for the test: ``{count: n}`` gives n numbered records."""

    def claims(self, spec: dict[str, Any]) -> bool:
        return "count" in spec

    def resolve(self, spec: dict[str, Any], where: str) -> dict[str, Any]:
        return spec

    def fingerprint(self, spec: dict[str, Any], h: Any) -> None:
        pass

    def dataset(self, spec: dict[str, Any]) -> Any:
        import datasets

        return datasets.Dataset.from_dict({"text": [f"record {i}" for i in range(spec["count"])]})

    def diagnose(self, spec: dict[str, Any]) -> str | None:
        return None


def test_a_new_source_is_one_registered_class(tmp_path: Path) -> None:
    from midtrain.data import sources

    source = sources.register_source(CountingSource())
    try:
        config = tmp_path / "p.yaml"
        config.write_text(
            yaml.safe_dump(
                {
                    "output": str(tmp_path / "store"),
                    "tokenizer": {"train": {"vocab_size": 300}},
                    "domains": {"n": {"source": {"count": 25}, "val_fraction": 0.2}},
                }
            )
        )
        assert main(["prepare", "--config", str(config)]) == 0
        d = Store(tmp_path / "store").domain("n")
        assert (d.train.num_docs, d.val.num_docs) == (20, 5)
    finally:
        sources._SOURCES.remove(source)
