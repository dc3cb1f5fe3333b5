"""SFT: prompt masking, packing without cross-attention, truncation, exact order, forgetting."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from tokenizers import Tokenizer

from midtrain import CausalLM, SFTDataModule
from midtrain.cli import main
from midtrain.data.prepare import DomainConfig, PrepareConfig, TokenizerConfig, prepare
from midtrain.data.sft import SFTStream, example_rows
from midtrain.data.store import Store
from midtrain.data.streams import BatchLayout
from midtrain.errors import MidtrainError
from tests.test_training import fit_config, scalars

QA = [{"q": f"What is {i} plus {i}?", "a": f"It is {2 * i}."} for i in range(60)]
QA.append({"q": "Tell me a long story. " * 40, "a": "Once upon a time. " * 40})  # truncated


@pytest.fixture(scope="module")
def sft_store(tmp_path_factory: pytest.TempPathFactory, builtin_store: Path) -> Path:
    src = tmp_path_factory.mktemp("sft") / "qa.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in QA))
    return prepare(
        PrepareConfig(
            output=str(src.parent / "store"),
            domains={
                "qa": DomainConfig(
                    source={"path": str(src)},
                    prompt="Q: {q}\nA: ",
                    response="{a}",
                    mask_prompt=True,
                    val_fraction=0.1,
                )
            },
            tokenizer=TokenizerConfig(path=str(builtin_store / "tokenizer.json")),
        )
    )


def stream(dm: SFTDataModule, start: int = 0, steps: int = 4, accumulation: int = 1):
    return SFTStream(
        dm.store.domain(dm.target).train,
        dm.target,
        dm.max_length,
        dm.packing,
        dm.seed,
        dm.store.eos_id,
        BatchLayout(dm.micro_batch_size, accumulation),
        start,
        steps,
    )


def test_prompt_tokens_are_masked_and_loss_matches_hand_computation(
    sft_store: Path, builtin_store: Path
) -> None:
    dm = SFTDataModule(str(sft_store), "qa", max_length=64, micro_batch_size=1)
    batch = stream(dm).micro_batch(0)
    tok = Tokenizer.from_file(str(sft_store / "tokenizer.json"))
    row = batch["input_ids"][0].tolist() + [batch["targets"][0, -1].item()]
    text = tok.decode(row[: batch["tokens"][0] + 1])
    prompt, answer = text.split("\nA: ")
    n_prompt = len(tok.encode(prompt + "\nA: ", add_special_tokens=False).ids)
    mask = batch["loss_mask"][0]
    # targets are tokens 1..: the prompt's tokens never count, the answer and EOS do
    assert mask[: n_prompt - 1].sum() == 0
    n_answer = len(tok.encode(answer.replace("<|endoftext|>", ""), add_special_tokens=False).ids)
    assert mask.sum() == n_answer + 1

    torch.manual_seed(0)
    lm = CausalLM(arch="tiny", vocab_size=512)
    lm.configure_model()
    losses, m = lm._token_losses(batch)
    logits = lm.model(batch["input_ids"])[0]
    by_hand = [
        F.cross_entropy(logits[t], batch["targets"][0, t]).item()
        for t in range(logits.shape[0])
        if mask[t] > 0
    ]
    assert (losses.sum() / m.sum()).item() == pytest.approx(np.mean(by_hand), rel=1e-5)


def test_packing_keeps_examples_whole_and_apart(sft_store: Path) -> None:
    padded = SFTDataModule(str(sft_store), "qa", max_length=64, micro_batch_size=4)
    packed = SFTDataModule(str(sft_store), "qa", max_length=64, micro_batch_size=4, packing=True)
    batch = stream(packed).micro_batch(0)
    docs, mask = batch["doc_ids"], batch["loss_mask"]
    assert docs.max() >= 1  # several examples per row
    # the first target of every later example is masked: nothing is predicted across examples
    boundary = (docs[:, 1:] != docs[:, :-1]) & (docs[:, 1:] >= 0)
    assert (mask[:, :-1][boundary[:, :]] == 0).all()
    # every example of an epoch appears exactly once, whole, in either mode
    lengths = np.diff(np.asarray(padded.store.domain("qa").train.doc_offsets))
    for mode in (False, True):
        rows = example_rows(lengths, 65, mode, seed=0, epoch=0, key=1)
        assert sorted(np.concatenate(rows).tolist()) == list(range(len(lengths)))
        if mode:
            assert all(np.minimum(lengths[r], 65).sum() <= 65 or len(r) == 1 for r in rows)


def test_packed_loss_equals_padded_loss_for_the_same_examples(sft_store: Path) -> None:
    torch.manual_seed(0)
    lm = CausalLM(arch="tiny", vocab_size=512)
    lm.configure_model()
    dm = SFTDataModule(str(sft_store), "qa", max_length=64, micro_batch_size=1, packing=True)
    s = stream(dm)
    row = s._row(0)
    assert len(row) >= 2
    packed = s.micro_batch(0)
    from midtrain.data.sft import build_row, collate_rows

    one_each = collate_rows(
        [build_row(s.split, np.array([e]), 65) for e in row], s.pad_id, 0, packed=False
    )
    with torch.no_grad():
        lp, mp = lm._token_losses(packed)
        lo, mo = lm._token_losses(one_each)
    assert mp.sum() == mo.sum()
    assert (lp.sum() / mp.sum()).item() == pytest.approx((lo.sum() / mo.sum()).item(), rel=1e-4)


def test_truncation_is_counted_and_order_resumes_exactly(sft_store: Path) -> None:
    dm = SFTDataModule(str(sft_store), "qa", max_length=32, micro_batch_size=3)
    assert dm.num_truncated >= 1
    full = [b["input_ids"] for b in stream(dm, 0, 30, accumulation=2)]
    tail = [b["input_ids"] for b in stream(dm, 20, 30, accumulation=2)]
    assert all(torch.equal(a, b) for a, b in zip(full[40:], tail, strict=True))
    assert all(b.shape[1] <= 32 for b in full)
    # epochs: 54 training examples, 30 steps x 6 = 180 rows, every epoch a new order
    s = stream(dm, 0, 30, accumulation=2)
    n = s.split.num_docs
    first, second = [s._row(g)[0] for g in range(n)], [s._row(g)[0] for g in range(n, 2 * n)]
    assert sorted(first) == sorted(second) == list(range(n)) and first != second


def test_sft_run_logs_in_domain_loss_and_forgetting(
    tmp_path: Path, builtin_store: Path, sft_store: Path
) -> None:
    pre = fit_config(tmp_path, builtin_store, "pre", max_steps=4, limit_val_batches=0)
    assert main(["fit", "--config", str(pre)]) == 0
    cfg = yaml.safe_load(pre.read_text())
    cfg["data"] = {
        "class_path": "midtrain.SFTDataModule",
        "init_args": {
            "store": str(sft_store),
            "target": "qa",
            "general_store": str(builtin_store),
            "general_val_sets": ["prose"],
            "max_length": 48,
            "micro_batch_size": 4,
            "packing": True,
            "val_max_examples": 8,
            "general_val_max_blocks": 8,
        },
    }
    cfg["model"]["init_from"] = str(tmp_path / "pre" / "checkpoints" / "last.ckpt")
    cfg["trainer"].update(default_root_dir=str(tmp_path / "sft"), max_steps=6, val_check_interval=3)
    del cfg["trainer"]["limit_val_batches"]  # the set sizes above decide what is evaluated
    sft = tmp_path / "sft.yaml"
    sft.write_text(yaml.safe_dump(cfg))
    assert main(["fit", "--config", str(sft)]) == 0
    tags = scalars(tmp_path / "sft")
    assert "val/qa/loss" in tags and "val/prose/loss" in tags  # in-domain and forgetting
    assert "train/loss/qa" in tags
    assert [s for s, _ in tags["val/prose/loss"]] == [2, 5]


def test_sft_bad_input(sft_store: Path, builtin_store: Path, tmp_path: Path) -> None:
    with pytest.raises(MidtrainError, match="unknown domain 'nope'"):
        SFTDataModule(str(sft_store), "nope")
    with pytest.raises(MidtrainError, match="unknown domain 'poetry'"):
        SFTDataModule(
            str(sft_store), "qa", general_store=str(builtin_store), general_val_sets=["poetry"]
        )
    other = tmp_path / "o.jsonl"
    other.write_text(
        "".join(json.dumps({"text": f"other text {i} " * 20}) + "\n" for i in range(30))
    )
    from tests.conftest import prepare_store

    different = prepare_store(tmp_path / "other", {"x": {"source": {"path": str(other)}}}, 300)
    with pytest.raises(MidtrainError, match="another tokenizer"):
        SFTDataModule(str(sft_store), "qa", general_store=str(different), general_val_sets=["x"])
    assert Store(sft_store).domain("qa").train.loss_mask is not None
