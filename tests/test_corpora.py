"""Pretokenized domains (``source: {format: megatron|npy|litdata}``), written by the formats' own
writers and read in place: token for token what megatron-core's ``IndexedDataset`` and litdata's
``StreamingDataset`` read, no token copied into the store, a moved or changed file refused at
open, and every bad input one line naming the file or key with nothing written. Needs the
``corpora`` and ``corpora-test`` extras (``tox -e corpora``)."""

from __future__ import annotations

import logging
import os
import shutil
import socket
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("megatron.core", reason="megatron-core: pip install 'midtrain[corpora-test]'")
pytest.importorskip("litdata", reason="litdata: pip install 'midtrain[corpora]'")

from midtrain.cli import main  # noqa: E402
from midtrain.data.corpora.split import sample_ranges  # noqa: E402
from midtrain.data.prepare.render import validation_split  # noqa: E402
from midtrain.data.store import Store, verify  # noqa: E402
from midtrain.errors import MidtrainError  # noqa: E402
from tests.corpora import (  # noqa: E402
    megatron_dataset,
    tokenizer_and_documents,
    write_litdata,
    write_megatron,
    write_npy,
)
from tests.test_bad_input import run_bad, write_yaml  # noqa: E402


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    d = tmp_path_factory.mktemp("corpus")
    tokenizer, docs = tokenizer_and_documents(d)
    return {"dir": d, "tokenizer": tokenizer, "docs": docs}


def prepare(out: Path, tokenizer: Path, domains: dict[str, Any]) -> Store:
    cfg = {"output": str(out), "tokenizer": {"path": str(tokenizer)}, "domains": domains}
    assert main(["prepare", "--config", str(write_yaml(out.parent / "prep.yaml", cfg))]) == 0
    return Store(out)


def split_docs(docs: list[np.ndarray], fraction: float) -> tuple[list, list]:
    in_val = validation_split(fraction, 0)
    return [d for i, d in enumerate(docs) if not in_val(i)], [
        d for i, d in enumerate(docs) if in_val(i)
    ]


def test_megatron_reads_what_megatron_core_reads(corpus: dict, tmp_path: Path) -> None:
    prefix = write_megatron(tmp_path / "pile", corpus["docs"]["prose"])
    store = prepare(
        tmp_path / "store",
        corpus["tokenizer"],
        {"pile": {"source": {"format": "megatron", "path": str(prefix)}, "val_fraction": 0.1}},
    )
    ds = megatron_dataset(prefix)
    theirs = [np.asarray(ds[i]) for i in range(len(ds))]  # type: ignore[arg-type]
    train, val = split_docs(theirs, 0.1)
    domain = store.domain("pile")
    for split, expected in ((domain.train, train), (domain.val, val)):
        assert split.num_docs == len(expected)
        tokens, mask = split.read(0, split.num_tokens)
        assert mask is None and np.array_equal(tokens, np.concatenate(expected))
        for i in (0, len(expected) // 2, len(expected) - 1):
            assert np.array_equal(split.document(i), expected[i][:-1])  # without its EOS
    # no token is copied: the domain holds index files only, far smaller than the .bin
    stored = sum(f.stat().st_size for f in (tmp_path / "store" / "pile").iterdir())
    assert stored < (tmp_path / "pile.bin").stat().st_size / 20
    assert domain.val.num_bytes > 0 and verify(tmp_path / "store") == [("pile", "ok")]


@pytest.mark.parametrize(
    "dtype", ["uint8", "int8", "int16", "int32", "int64", "float64", "float32", "uint16"]
)
def test_megatron_every_dtype_code(corpus: dict, tmp_path: Path, dtype: str) -> None:
    docs = [d % 100 for d in corpus["docs"]["code"][:10]]  # ids every type holds
    prefix = write_megatron(tmp_path / "m", docs, getattr(np, dtype))
    store = prepare(
        tmp_path / "store",
        corpus["tokenizer"],
        {"m": {"source": {"format": "megatron", "path": str(prefix)}, "val_fraction": 0}},
    )
    ds = megatron_dataset(prefix)
    theirs = np.concatenate([np.asarray(ds[i]) for i in range(len(ds))])  # type: ignore[arg-type]
    split = store.domain("m").train
    tokens, _ = split.read(3, split.num_tokens)
    assert tokens.dtype.kind in "iu" and np.array_equal(tokens, theirs[3:])


def test_npy_documents_end_at_eos(corpus: dict, tmp_path: Path) -> None:
    docs = corpus["docs"]["code"]
    write_npy(tmp_path / "part-0.npy", docs[:15], "uint32")
    write_npy(tmp_path / "part-1.npy", docs[15:], "uint32")
    # the last document of a file without a final EOS ends with the file
    last = docs[-1][:-1]
    np.concatenate([*docs[15:-1], last]).astype("uint32").tofile(tmp_path / "part-1.npy")
    store = prepare(
        tmp_path / "store",
        corpus["tokenizer"],
        {
            "code": {
                "source": {
                    "format": "npy",
                    "path": str(tmp_path / "part-*.npy"),
                    "dtype": "uint32",
                },
                "val_fraction": 0.2,
            }
        },
    )
    train, val = split_docs([*docs[:-1], last], 0.2)
    domain = store.domain("code")
    assert np.array_equal(domain.train.read(0, domain.train.num_tokens)[0], np.concatenate(train))
    assert np.array_equal(domain.val.read(0, domain.val.num_tokens)[0], np.concatenate(val))
    assert np.diff(domain.val.doc_offsets).tolist() == [len(d) for d in val]


def streaming_tokens(path: str, cache: Path) -> np.ndarray:
    """Every token as litdata's own StreamingDataset reads it (one token per item)."""
    from litdata import StreamingDataset
    from litdata.streaming.item_loader import TokensLoader

    ds = StreamingDataset(
        path, item_loader=TokensLoader(block_size=1), shuffle=False, cache_dir=str(cache)
    )
    return np.concatenate([np.asarray(ds[i]) for i in range(len(ds))])


def test_litdata_reads_what_streaming_dataset_reads(corpus: dict, tmp_path: Path) -> None:
    docs = corpus["docs"]["code"][:30]
    write_litdata(str(tmp_path / "lit"), docs)
    store = prepare(
        tmp_path / "store",
        corpus["tokenizer"],
        {
            "lit": {
                "source": {"format": "litdata", "path": str(tmp_path / "lit")},
                "val_fraction": 0,
            }
        },
    )
    split = store.domain("lit").train
    tokens = split.read(0, split.num_tokens)[0]
    assert np.array_equal(tokens, streaming_tokens(str(tmp_path / "lit"), tmp_path / "cache"))
    assert np.diff(split.doc_offsets).tolist() == [len(d) for d in docs]  # items are documents
    assert len(store.domain("lit").manifest["corpus"]["files"]) > 3  # several chunks, in order


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def s3(monkeypatch: pytest.MonkeyPatch) -> Any:
    """moto's S3 server on 127.0.0.1 (started here, stopped after), as the AWS endpoint."""
    moto_server = pytest.importorskip("moto.server", reason="moto[server]: the corpora-test extra")
    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    port = free_port()
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    for key, value in {
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }.items():
        monkeypatch.setenv(key, value)
    # litdata fetches chunks with obstore when installed, which refuses plain http; the test
    # server speaks http on 127.0.0.1, so its other fetcher (boto3) does the downloads here
    import litdata.streaming.downloader as downloader

    monkeypatch.setattr(downloader, "_OBSTORE_AVAILABLE", False)
    import boto3

    client = boto3.client("s3")
    client.create_bucket(Bucket="corpus")
    yield client
    server.stop()


def test_litdata_from_object_storage(corpus: dict, tmp_path: Path, s3: Any) -> None:
    docs = corpus["docs"]["code"][:30]
    local = write_litdata(str(tmp_path / "lit"), docs)
    for f in sorted(os.listdir(local)):
        s3.upload_file(os.path.join(local, f), "corpus", f"tok/{f}")
    cache = tmp_path / "litdata-cache"
    source = {"format": "litdata", "path": "s3://corpus/tok", "cache_dir": str(cache)}
    store = prepare(
        tmp_path / "store", corpus["tokenizer"], {"lit": {"source": source, "val_fraction": 0.1}}
    )
    domain = store.domain("lit")
    train, val = split_docs(docs, 0.1)
    assert np.array_equal(domain.train.read(0, domain.train.num_tokens)[0], np.concatenate(train))
    assert np.array_equal(domain.val.read(0, domain.val.num_tokens)[0], np.concatenate(val))
    assert len(list(cache.rglob("chunk-*.bin"))) > 3  # reads went through litdata's cache
    expected = streaming_tokens("s3://corpus/tok", tmp_path / "their-cache")
    assert np.array_equal(expected, np.concatenate(docs))
    # an object of the bucket replaced (one the sampled checksum reads): refused at open
    files = domain.manifest["corpus"]["files"]
    ranges = sample_ranges([f["bytes"] for f in files], local=False)
    name = next(f["path"] for f, r in zip(files, ranges, strict=True) if r).rsplit("/", 1)[1]
    s3.put_object(Bucket="corpus", Key=f"tok/{name}", Body=b"\0" * 64)
    shutil.rmtree(cache)
    with pytest.raises(MidtrainError, match=rf"s3://corpus/tok/{name}: cannot be read"):
        Store(tmp_path / "store").domain("lit")


def test_moved_or_changed_files_are_refused_at_open(corpus: dict, tmp_path: Path) -> None:
    prefix = write_megatron(tmp_path / "pile", corpus["docs"]["prose"])
    domains = {"pile": {"source": {"format": "megatron", "path": str(prefix)}, "val_fraction": 0}}
    prepare(tmp_path / "store", corpus["tokenizer"], domains)
    bin_path = tmp_path / "pile.bin"
    bin_path.rename(tmp_path / "moved.bin")
    with pytest.raises(MidtrainError, match=r"pile.bin: not found \(moved or deleted"):
        Store(tmp_path / "store").domain("pile")
    (tmp_path / "moved.bin").rename(bin_path)
    data = bytearray(bin_path.read_bytes())
    data[-2:] = b"\x07\x00"  # the last block is always sampled
    bin_path.write_bytes(bytes(data))
    with pytest.raises(MidtrainError, match=r"pile.bin: its content changed since prepare"):
        Store(tmp_path / "store").domain("pile")
    bin_path.write_bytes(bytes(data) + b"\0\0")
    with pytest.raises(
        MidtrainError, match=r"pile.bin: [\d,]+ bytes, [\d,]+ at prepare: the file changed"
    ):
        Store(tmp_path / "store").domain("pile")


def test_a_token_beyond_the_vocabulary_is_caught_when_read(corpus: dict, tmp_path: Path) -> None:
    """Megatron files are checked where sampled at prepare; every block read is checked too."""
    docs = [d.copy() for d in corpus["docs"]["prose"]]
    prefix = write_megatron(tmp_path / "pile", docs)
    prepare(
        tmp_path / "store",
        corpus["tokenizer"],
        {"pile": {"source": {"format": "megatron", "path": str(prefix)}, "val_fraction": 0}},
    )
    split = Store(tmp_path / "store").domain("pile").train
    size = (tmp_path / "pile.bin").stat().st_size
    sampled = np.zeros(size, dtype=bool)
    for offset, length in sample_ranges([size], local=True)[0]:
        sampled[offset : offset + length] = True
    at = int(np.flatnonzero(~sampled[::2])[len(sampled) // 8])  # a token the checksum skips
    raw = np.memmap(tmp_path / "pile.bin", dtype=np.uint16, mode="r+")
    raw[at] = 9999
    raw.flush()
    del raw
    with pytest.raises(MidtrainError, match=rf"pile.bin: token id 9999 at token {at:,} is outside"):
        split.read(at - 3, at + 3)
    report = dict(verify(tmp_path / "store"))  # --verify reads every token
    assert "token id 9999" in report["pile"]


# -- bad input: one line naming the file or key, exit 2, nothing written ---------------------------


def _npy_odd(tmp: Path, corpus: dict) -> tuple[dict, str]:
    (tmp / "odd.npy").write_bytes(b"\1\0\2\0\3")
    return {
        "format": "npy",
        "path": str(tmp / "odd.npy"),
        "dtype": "uint16",
    }, "odd.npy: 5 bytes is not a whole number of uint16 tokens"


def _idx_header(tmp: Path, corpus: dict) -> tuple[dict, str]:
    prefix = write_megatron(tmp / "m", corpus["docs"]["code"][:3])
    data = bytearray((tmp / "m.idx").read_bytes())
    data[:4] = b"XXXX"
    (tmp / "m.idx").write_bytes(bytes(data))
    return {"format": "megatron", "path": str(prefix)}, "m.idx: unknown header"


def _idx_version(tmp: Path, corpus: dict) -> tuple[dict, str]:
    prefix = write_megatron(tmp / "m", corpus["docs"]["code"][:3])
    data = bytearray((tmp / "m.idx").read_bytes())
    data[9] = 2
    (tmp / "m.idx").write_bytes(bytes(data))
    return {"format": "megatron", "path": str(prefix)}, "m.idx: index version 2; only version 1"


def _bin_truncated(tmp: Path, corpus: dict) -> tuple[dict, str]:
    prefix = write_megatron(tmp / "m", corpus["docs"]["code"][:3])
    data = (tmp / "m.bin").read_bytes()
    (tmp / "m.bin").write_bytes(data[:-10])
    return {"format": "megatron", "path": str(prefix)}, "m.bin: .* the .bin is truncated"


def _litdata_no_index(tmp: Path, corpus: dict) -> tuple[dict, str]:
    (tmp / "chunks").mkdir()
    (tmp / "chunks" / "chunk-0-0.bin").write_bytes(b"\0" * 16)
    return {"format": "litdata", "path": str(tmp / "chunks")}, "chunks has no index.json"


def _beyond_vocab(tmp: Path, corpus: dict) -> tuple[dict, str]:
    docs = [*corpus["docs"]["code"][:3], np.array([5, 600, 7])]
    write_npy(tmp / "v.npy", docs)
    return {
        "format": "npy",
        "path": str(tmp / "v.npy"),
        "dtype": "uint16",
    }, "v.npy: token id 600 at token .* outside the tokenizer's vocabulary of 512"


BAD_SOURCES = {
    "npy-byte-count": _npy_odd,
    "idx-header": _idx_header,
    "idx-version": _idx_version,
    "bin-truncated": _bin_truncated,
    "litdata-no-index": _litdata_no_index,
    "token-beyond-vocab": _beyond_vocab,
}


@pytest.mark.parametrize("case", sorted(BAD_SOURCES))
def test_bad_files_are_one_line(
    case: str, corpus: dict, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    source, expected = BAD_SOURCES[case](tmp_path, corpus)
    cfg = {
        "output": str(tmp_path / "store"),
        "tokenizer": {"path": str(corpus["tokenizer"])},
        "domains": {"bad": {"source": source}},
    }
    line = run_bad(
        capsys, ["prepare", "--config", str(write_yaml(tmp_path / "p.yaml", cfg))], [tmp_path]
    )
    import re

    assert re.search(expected, line), line
    assert not (tmp_path / "store").exists()


def test_the_tokenizer_must_be_given(
    corpus: dict, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    write_npy(tmp_path / "a.npy", corpus["docs"]["code"][:3])
    cfg = {
        "output": str(tmp_path / "store"),
        "tokenizer": {"train": {"vocab_size": 300}},
        "domains": {
            "a": {"source": {"format": "npy", "path": str(tmp_path / "a.npy"), "dtype": "uint16"}}
        },
    }
    line = run_bad(
        capsys, ["prepare", "--config", str(write_yaml(tmp_path / "p.yaml", cfg))], [tmp_path]
    )
    assert "tokenizer.train: domain 'a' is already tokenized" in line
