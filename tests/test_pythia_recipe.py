"""The Pythia recipe's CPU twin (configs/prepare/cpu-pythia-pile.yaml, then
configs/midtrain/cpu-pythia-pile.yaml) run as shipped: a miniature GPT-NeoX saved with
transformers stands in for pythia-160m@step100000, a Megatron file of 33-token items written by
megatron-core for the pre-shuffled Pile; the run starts at item 256 and switches code in."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("megatron.core", reason="megatron-core: pip install 'midtrain[corpora-test]'")

from midtrain.cli import main  # noqa: E402
from midtrain.train.optim import lr_at  # noqa: E402
from tests.corpora import items, tokenizer_and_documents, write_megatron, write_npy  # noqa: E402
from tests.test_interop import random_hf_model  # noqa: E402

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def test_schedule_offset_continues_pythias_schedule() -> None:
    pythia = {"lr": 6e-4, "min_lr": 6e-5, "warmup": 1430, "max_steps": 43_000}
    pythia |= {"schedule": "cosine", "offset": 100_000}
    assert lr_at(0, **pythia) == pytest.approx(1.738e-4, rel=1e-3)
    assert lr_at(43_000, **pythia) == pytest.approx(6e-5)
    assert lr_at(0, **{**pythia, "offset": 0}) == pytest.approx(6e-4 / 1430)


def test_the_cpu_twin_runs_as_shipped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data" / "cpu-pythia").mkdir(parents=True)
    tokenizer, docs = tokenizer_and_documents(tmp_path)
    eos = docs["prose"][0][-1]
    base = tmp_path / "tokenizer-only"  # what random_hf_model reads: a tokenizer and its EOS
    base.mkdir()
    (base / "tokenizer.json").write_bytes(tokenizer.read_bytes())
    (base / "store.json").write_text(json.dumps({"eos_id": int(eos)}))
    random_hf_model("pythia", tmp_path / "runs" / "cpu-pythia" / "model", base)
    write_megatron(tmp_path / "data" / "cpu-pythia" / "pile", items(docs["prose"], 33, 700))
    write_npy(tmp_path / "data" / "cpu-pythia" / "code.npy", docs["code"])
    assert main(["prepare", "--config", str(CONFIGS / "prepare" / "cpu-pythia-pile.yaml")]) == 0
    assert main(["fit", "--config", str(CONFIGS / "midtrain" / "cpu-pythia-pile.yaml")]) == 0
    last = tmp_path / "runs" / "cpu" / "pythia-pile" / "checkpoints" / "last.ckpt"
    state = torch.load(last, map_location="cpu", weights_only=False)
    data = next(v for k, v in state.items() if k.endswith("MixtureDataModule"))
    assert data["fingerprint"]["start_items"] == {"pile": 256}
    assert data["fingerprint"]["order"] == {"pile": "sequential"}
    assert state["global_step"] == 20
    # the miniature's own schedule continued from step 16 (a 36-step cosine with 2 warmup steps)
    lr = state["optimizer_states"][0]["param_groups"][0]["lr"]  # that of step 20, the next
    expected = lr_at(20, lr=1e-3, min_lr=1e-4, warmup=2, max_steps=20, schedule="cosine", offset=16)
    assert lr == pytest.approx(expected)
