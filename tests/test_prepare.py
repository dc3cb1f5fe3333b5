"""`midtrain prepare` on real text: exact round trip, counts, masks, splits, reuse."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from tokenizers import Tokenizer

from midtrain.data.prepare import validation_split
from midtrain.data.store import Store
from tests.conftest import SHARED, SHARED_DOMAINS, needs_shared, prepare_store


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def _split_of(i: int, val_fraction: float, seed: int = 0) -> str:
    return "val" if validation_split(val_fraction, seed)(i) else "train"


@needs_shared
@pytest.mark.parametrize(
    "domain,file,cap",
    [("c4", "general/c4_demo.jsonl", None), ("code", "code/cpython311_stdlib.jsonl", 120)],
)
def test_round_trip_and_counts(shared_store: Path, domain: str, file: str, cap: int | None) -> None:
    store = Store(shared_store)
    tok = Tokenizer.from_file(str(store.tokenizer_path))
    d = store.domain(domain)
    records = [(i, r["text"]) for i, r in enumerate(_jsonl(SHARED / file)) if r["text"]]
    records = records[:cap] if cap else records
    expected = {"train": [], "val": []}
    for i, text in records:
        expected[_split_of(i, 0.1)].append(text)
    for split in ("train", "val"):
        s = d.split(split)
        assert s.num_docs == len(expected[split]) > 0
        for j, text in enumerate(expected[split]):
            ids = s.document(j)
            # decoding a store gives back the source text exactly
            assert tok.decode(ids.tolist(), skip_special_tokens=False) == text
            assert s.tokens[s.doc_offsets[j + 1] - 1] == store.eos_id
            assert s.doc_bytes[j] == len(text.encode("utf-8"))
        # per-domain token counts equal the tokenizer's on the source (+1 EOS per document)
        n = sum(len(e.ids) + 1 for e in tok.encode_batch(expected[split], add_special_tokens=False))
        assert s.num_tokens == n == d.manifest["splits"][split]["tokens"]
    assert d.dtype == np.uint16


@needs_shared
def test_prompt_tokens_are_masked(shared_store: Path) -> None:
    store = Store(shared_store)
    tok = Tokenizer.from_file(str(store.tokenizer_path))
    train = store.domain("gsm8k").train
    assert train.loss_mask is not None
    first = _jsonl(SHARED / "math/gsm8k_train.jsonl")[0]  # record 9 is the first val one
    prompt = f"Question: {first['question']}\nAnswer: "
    n_prompt = len(tok.encode(prompt, add_special_tokens=False).ids)
    lo, hi = train.doc_offsets[0], train.doc_offsets[1]
    mask = np.asarray(train.loss_mask[lo:hi])
    assert mask[:n_prompt].sum() == 0 and mask[n_prompt:].all()
    assert tok.decode(train.document(0).tolist()) == prompt + first["answer"]


def test_reuse_and_change_detection(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    src = tmp_path / "docs.jsonl"
    src.write_text(
        "".join(json.dumps({"text": f"document number {i} " * 20}) + "\n" for i in range(60))
    )
    domains = {"a": {"source": {"path": str(src)}, "val_fraction": 0.1}}
    root = prepare_store(tmp_path / "store", domains, vocab_size=300)
    tokens = root / "a" / "train.tokens"
    before = (tokens.stat().st_mtime_ns, tokens.read_bytes())
    capsys.readouterr()

    prepare_store(tmp_path / "store", domains, vocab_size=300)
    assert "reused" in capsys.readouterr().out
    assert tokens.stat().st_mtime_ns == before[0]

    with src.open("a") as f:  # a changed source is detected and rebuilt
        f.write(json.dumps({"text": "one more document"}) + "\n")
    prepare_store(tmp_path / "store", domains, vocab_size=300)
    out = capsys.readouterr().out
    assert "building (source, config or tokenizer changed)" in out
    store = Store(root)
    assert store.domain("a").train.num_docs + store.domain("a").val.num_docs == 61


def test_split_is_deterministic_and_eval_only(tmp_path: Path) -> None:
    src = tmp_path / "docs.jsonl"
    src.write_text("".join(json.dumps({"text": f"doc {i}"}) + "\n" for i in range(40)))
    root = prepare_store(
        tmp_path / "s",
        {
            "a": {"source": {"path": str(src)}, "val_fraction": 0.25},
            "held_out": {"source": {"path": str(src)}, "val_fraction": 1.0},
        },
        vocab_size=300,
    )
    store = Store(root)
    tok = Tokenizer.from_file(str(store.tokenizer_path))
    val = [tok.decode(store.domain("a").val.document(j).tolist()) for j in range(10)]
    assert val == [f"doc {i}" for i in range(3, 40, 4)]
    assert store.domain("held_out").train.num_docs == 0
    assert store.domain("held_out").val.num_docs == 40


def test_builtin_store_has_all_domains(builtin_store: Path) -> None:
    store = Store(builtin_store)
    assert store.domain_names == ["prose", "code", "math"]
    for name in store.domain_names:
        d = store.domain(name)
        assert d.train.num_tokens > 1000 and d.val.num_docs > 0
    assert store.domain("math").train.loss_mask is None  # mask_prompt: false


def test_failed_rebuild_leaves_store_untouched(tmp_path: Path) -> None:
    good = tmp_path / "good.jsonl"
    good.write_text("".join(json.dumps({"text": f"text {i} " * 10}) + "\n" for i in range(30)))
    root = prepare_store(tmp_path / "store", {"a": {"source": {"path": str(good)}}}, 300)
    snapshot = {p: p.read_bytes() for p in root.rglob("*") if p.is_file()}
    empty = tmp_path / "empty.jsonl"
    empty.write_text(json.dumps({"text": ""}) + "\n")
    from midtrain.errors import MidtrainError

    with pytest.raises(MidtrainError, match="empty domain"):
        prepare_store(
            tmp_path / "store",
            {
                "a": {"source": {"path": str(good)}, "max_docs": 5},
                "b": {"source": {"path": str(empty)}},
            },
            300,
        )
    assert {p: p.read_bytes() for p in root.rglob("*") if p.is_file()} == snapshot
    assert not any(p.name.startswith(".staging") for p in root.iterdir())
    shutil.rmtree(root)


@needs_shared
def test_shared_domains_cover_the_sample(shared_store: Path) -> None:
    assert set(Store(shared_store).domain_names) == set(SHARED_DOMAINS)


def test_streaming_source_with_token_cap_and_tokenizer_file(tmp_path: Path) -> None:
    src = tmp_path / "docs.jsonl"
    src.write_text(
        "".join(json.dumps({"body": f"streamed document {i} " * 30}) + "\n" for i in range(200))
    )
    first = prepare_store(
        tmp_path / "a", {"a": {"source": {"path": str(src)}, "text": "{body}"}}, vocab_size=300
    )
    from midtrain.data.prepare import DomainConfig, PrepareConfig, TokenizerConfig, prepare

    root = prepare(
        PrepareConfig(
            output=str(tmp_path / "b"),
            domains={
                "s": DomainConfig(
                    source={"path": "json", "data_files": str(src), "streaming": True},
                    text="{body}",
                    max_tokens=2000,
                )
            },
            tokenizer=TokenizerConfig(path=str(first / "tokenizer.json")),
        )
    )
    store = Store(root)
    d = store.domain("s")
    total = d.train.num_tokens + d.val.num_tokens
    per_doc = d.train.doc_offsets[1]  # documents are all about the same length
    assert 2000 <= total < 2000 + 2 * per_doc  # stops at the first document past the cap
    assert store.tokenizer_hash == Store(first).tokenizer_hash


def test_validation_share_is_exact() -> None:
    for fraction, n in [(0.1, 1000), (0.3, 1000), (0.05, 997), (0.8, 10), (1.0, 7), (0.0, 50)]:
        for seed in (0, 3):
            in_val = validation_split(fraction, seed)
            picked = [i for i in range(n) if in_val(i)]
            assert abs(len(picked) - fraction * n) <= 1
    assert [i for i in range(10) if validation_split(0.3, 0)(i)] == [3, 6, 9]


def test_chat_turns_mask_all_but_the_trained_roles(tmp_path: Path) -> None:
    src = tmp_path / "chat.jsonl"
    records = [
        {
            "messages": [
                {"role": "user", "content": f"hello {i}"},
                {"role": "assistant", "content": f"hi there {i}"},
                {"role": "user", "content": "bye"},
                {"role": "assistant", "content": "goodbye"},
            ]
        }
        for i in range(20)
    ] + [{"messages": ["plain user turn", "plain assistant turn"]}]  # LIMA-style strings
    src.write_text("".join(json.dumps(r) + "\n" for r in records))
    root = prepare_store(
        tmp_path / "s",
        {"c": {"source": {"path": str(src)}, "chat": "messages", "val_fraction": 0.0}},
        300,
    )
    store = Store(root)
    tok = Tokenizer.from_file(str(store.tokenizer_path))
    train = store.domain("c").train
    for j, rec in enumerate(records):
        lo, hi = train.doc_offsets[j], train.doc_offsets[j + 1]
        ids, mask = np.asarray(train.tokens[lo:hi]), np.asarray(train.loss_mask[lo:hi])
        turns = rec["messages"]
        texts = [
            (
                f"{t['role']}: {t['content']}\n"
                if isinstance(t, dict)
                else f"{'user' if k % 2 == 0 else 'assistant'}: {t}\n"
            )
            for k, t in enumerate(turns)
        ]
        assert tok.decode(ids[:-1].tolist()) == "".join(texts)
        trained = "".join(tok.decode(ids[:-1][mask[:-1] == 1].tolist()).split())
        assert trained == "".join("".join(t for t in texts if t.startswith("assistant")).split())
        assert mask[-1] == 1  # EOS counts
