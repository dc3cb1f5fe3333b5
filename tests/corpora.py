"""Pretokenized corpora for tests and benchmarks, written by the formats' own writers:
megatron-core's ``IndexedDatasetBuilder``, ``litdata.optimize`` (``TokensLoader``) and numpy.
The tokens are real text (CPython's docs and sources) encoded with a byte-level BPE trained
here, the store's tokenizer."""

from __future__ import annotations

import warnings
from itertools import islice
from pathlib import Path

import numpy as np

from midtrain.data.builtin import python_docs, python_stdlib
from midtrain.data.tokenizer import train_bpe

EOS = "<|endoftext|>"


def texts(kind: str, n: int) -> list[str]:
    source = python_docs if kind == "prose" else python_stdlib
    return [r["text"] for r in islice(source(), n) if r["text"].strip()]


def tokenizer_and_documents(
    directory: Path, n_prose: int = 120, n_code: int = 40, vocab: int = 512
) -> tuple[Path, dict[str, list[np.ndarray]]]:
    """A tokenizer.json in ``directory`` and documents (token ids, EOS last) of prose and code."""
    prose, code = texts("prose", n_prose), texts("code", n_code)
    tok = train_bpe(prose[:60] + code[:20], vocab, EOS)
    path = directory / "tokenizer.json"
    tok.save(str(path))
    eos = tok.token_to_id(EOS)
    tok.encode_special_tokens = True
    docs = {
        name: [np.array([*e.ids, eos], dtype=np.int64) for e in tok.encode_batch(t)]
        for name, t in (("prose", prose), ("code", code))
    }
    return path, docs


def write_megatron(prefix: Path, documents: list[np.ndarray], dtype: type = np.uint16) -> Path:
    """``<prefix>.bin`` / ``.idx`` by megatron-core's builder, one document per array."""
    import torch

    with warnings.catch_warnings():  # megatron-core warns about its optional GPU packages
        warnings.simplefilter("ignore")
        from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    builder = IndexedDatasetBuilder(f"{prefix}.bin", dtype=dtype)
    for doc in documents:
        builder.add_document(torch.from_numpy(doc.astype(np.int64)), [len(doc)])
    builder.finalize(f"{prefix}.idx")
    return prefix


def megatron_dataset(prefix: Path) -> object:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from megatron.core.datasets.indexed_dataset import IndexedDataset

    return IndexedDataset(str(prefix))


def items(documents: list[np.ndarray], size: int, count: int | None = None) -> list[np.ndarray]:
    """The documents' tokens cut into items of ``size`` tokens, as Pythia's pre-shuffled Pile."""
    flat = np.concatenate(documents)
    n = len(flat) // size if count is None else count
    flat = np.resize(flat, n * size)  # repeats the text when more items are asked for
    return [flat[i * size : (i + 1) * size] for i in range(n)]


def write_npy(path: Path, documents: list[np.ndarray], dtype: str = "uint16") -> Path:
    np.concatenate(documents).astype(dtype).tofile(path)
    return path


def _item(i: int, documents: list[np.ndarray]) -> np.ndarray:
    return documents[i]


def write_litdata(output: str, documents: list[np.ndarray], chunk_bytes: str = "2KB") -> str:
    """``litdata.optimize`` with its ``TokensLoader``: one item per document."""
    from functools import partial

    from litdata import optimize
    from litdata.streaming.item_loader import TokensLoader

    arrays = [d.astype(np.uint16) for d in documents]
    optimize(
        fn=partial(_item, documents=arrays),
        inputs=list(range(len(arrays))),
        output_dir=output,
        chunk_bytes=chunk_bytes,
        item_loader=TokensLoader(),
        num_workers=1,
        mode="overwrite",
    )
    return output
