"""``order: sequential`` and ``start_items``: a sequential domain's sequences over a run are its
items n, n+1, ... in step order and, within a step, in slot order (accumulation micro-step,
rank, row), whatever the weights, switches, ramps, runtime changes, loader workers,
accumulation and world size, and across a resume; a ``keep`` fork continues at the next unread
item, a ``fresh`` fork starts at its own ``start_items``. Item i is tokens [i(seq_len+1),
(i+1)(seq_len+1)): here a Megatron file of 17-token items read at seq_len 16, as Pythia's
2049-token items at 2048."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
import yaml

pytest.importorskip("megatron.core", reason="megatron-core: pip install 'midtrain[corpora-test]'")

from midtrain import CausalLM, MixtureDataModule  # noqa: E402
from midtrain.data.contract import StepLoader  # noqa: E402
from midtrain.data.mixture import MixtureSchedule, Phase  # noqa: E402
from midtrain.data.prepare import DomainConfig, PrepareConfig, TokenizerConfig, prepare  # noqa: E402
from midtrain.data.streams import BatchLayout, MixtureStream  # noqa: E402
from midtrain.errors import MidtrainError  # noqa: E402
from midtrain.train.callbacks.checkpoints import ModelCheckpoint  # noqa: E402
from midtrain.train.callbacks.mixture import MixtureSwitch  # noqa: E402
from midtrain.train.trainer import Trainer  # noqa: E402
from tests.corpora import items, tokenizer_and_documents, write_megatron, write_npy  # noqa: E402
from tests.helpers import ChangeWeightsAt, SaveBatches, fit_or_fork  # noqa: E402, fit_or_fork

SEQ = 16
REPO = Path(__file__).resolve().parents[1]
TINY = {"n_layer": 1, "n_embd": 32, "n_head": 2, "block_size": 64}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A store with `pile` (Megatron, 17-token items, sequential), `web` and `code` (npy)."""
    d = tmp_path_factory.mktemp("sequential")
    tokenizer, docs = tokenizer_and_documents(d)
    pile = items(docs["prose"], SEQ + 1)
    write_megatron(d / "pile", pile)
    write_npy(d / "web.npy", docs["prose"][::-1])
    write_npy(d / "code.npy", docs["code"])

    def npy(name: str) -> dict[str, Any]:
        return {"format": "npy", "path": str(d / f"{name}.npy"), "dtype": "uint16"}

    config = PrepareConfig(
        output=str(d / "store"),
        tokenizer=TokenizerConfig(path=str(tokenizer)),
        domains={
            "pile": DomainConfig(
                source={"format": "megatron", "path": str(d / "pile")},
                val_fraction=0,
                order="sequential",
            ),
            "web": DomainConfig(source=npy("web"), val_fraction=0.1),
            "code": DomainConfig(source=npy("code"), val_fraction=0.1),
        },
    )
    return {"store": prepare(config), "items": np.stack(pile)}


def pile_rows(rows: list[tuple[int, np.ndarray]], dm: MixtureDataModule) -> np.ndarray:
    """The sequential domain's rows (inputs + last target), in the order given."""
    pile = dm.domains.index("pile")
    return np.array([r for d, r in rows if d == pile])


def batch_rows(batch: dict[str, torch.Tensor]) -> list[tuple[int, np.ndarray]]:
    full = torch.cat([batch["input_ids"], batch["targets"][:, -1:]], dim=1).numpy()
    return list(zip(batch["domain"].tolist(), full, strict=True))


PHASES = [
    Phase(0, {"pile": 0.5, "web": 0.5}),
    Phase(3, {"pile": 0.2, "web": 0.4, "code": 0.4}, ramp_steps=3, ramp="cosine"),
    Phase(7, {"pile": 0.7, "code": 0.3}),
    Phase(9, {"pile": 1.0}),
]


def global_rows(
    dm: MixtureDataModule, micro: int, acc: int, world: int, workers: int, steps: int
) -> list[tuple[int, np.ndarray]]:
    """Every slot of every step, in (step, slot) order, from each rank's own stream."""
    schedule = MixtureSchedule(dm.domains, PHASES, micro * acc * world, dm.seed)
    starts = [dm.start_items.get(n, 0) if dm.sequential(n) else None for n in dm.domains]
    splits = [dm.store.domain(n).train for n in dm.domains]
    slots: dict[tuple[int, int], tuple[int, np.ndarray]] = {}
    for rank in range(world):
        stream = MixtureStream(
            splits, schedule, SEQ, BatchLayout(micro, acc, rank, world), 0, steps, sequential=starts
        )
        loader = StepLoader(stream, num_workers=workers) if workers else stream
        for k, batch in enumerate(loader):
            step, a = divmod(k, acc)
            for i, row in enumerate(batch_rows(batch)):
                slots[(step, (a * world + rank) * micro + i)] = row
    return [slots[key] for key in sorted(slots)]


def test_items_follow_slot_order_for_any_layout(corpus: dict) -> None:
    dm = MixtureDataModule(
        str(corpus["store"]), seq_len=SEQ, micro_batch_size=1, start_items={"pile": 40}
    )
    layouts = [(8, 1, 1, 0), (2, 2, 2, 0), (1, 4, 2, 2), (4, 2, 1, 3)]  # micro, acc, world, workers
    runs = [global_rows(dm, *layout, steps=11) for layout in layouts]
    for other in runs[1:]:
        assert all(
            a[0] == b[0] and np.array_equal(a[1], b[1]) for a, b in zip(runs[0], other, strict=True)
        )
    rows = pile_rows(runs[0], dm)
    assert np.array_equal(rows, corpus["items"][40 : 40 + len(rows)])
    assert len(rows) > 30 and len({d for d, _ in runs[0]}) == 3  # mixed with both other domains


def test_start_items_errors(corpus: dict) -> None:
    store = str(corpus["store"])
    with pytest.raises(
        MidtrainError, match=r"data.start_items.web: domain 'web' is read in a shuffled order"
    ):
        MixtureDataModule(store, seq_len=SEQ, start_items={"web": 3})
    n = len(corpus["items"])
    with pytest.raises(
        MidtrainError,
        match=rf"data.start_items.pile: item {n:,} is past the end of the domain \({n:,} items",
    ):
        MixtureDataModule(store, seq_len=SEQ, start_items={"pile": n})
    with pytest.raises(MidtrainError, match=r"data.start_items.nope: unknown domain"):
        MixtureDataModule(store, seq_len=SEQ, start_items={"nope": 1})


def fit(
    store: Path,
    root: Path,
    max_steps: int,
    callbacks: list,
    ckpt_path: str | None = None,
    fork_step: int | None = None,
    fork_data: str = "keep",
    start: int = 100,
) -> MixtureDataModule:
    dm = MixtureDataModule(
        str(store), weights={"pile": 0.5, "web": 0.5}, seq_len=SEQ, micro_batch_size=2,
        num_workers=1, val_max_blocks=2, start_items={"pile": start},
    )  # fmt: skip
    torch.manual_seed(0)
    model = CausalLM(arch="tiny", model_config=TINY, vocab_size=dm.vocab_size, lr=1e-3, warmup=1)
    trainer = Trainer(
        accelerator="cpu", devices=1, max_steps=max_steps, default_root_dir=str(root),
        logger=False, enable_progress_bar=False, enable_model_summary=False,
        limit_val_batches=0, num_sanity_val_steps=0, accumulate_grad_batches=2,
        callbacks=[
            ModelCheckpoint(dirpath=str(root / "checkpoints"), save_last=True, save_top_k=-1, every_n_train_steps=2),
            MixtureSwitch({"pile": 0.25, "web": 0.25, "code": 0.5}, step=2, ramp_steps=2, save_checkpoint=False),
            *callbacks,
        ],
    )  # fmt: skip
    fit_or_fork(trainer, model, dm, ckpt_path, fork_step, fork_data=fork_data)
    return dm


def rows_of(saved: SaveBatches) -> list[tuple[int, np.ndarray]]:
    return [row for batch in saved.batches for row in batch_rows(batch)]


def ckpt(root: Path, step: int) -> str:
    return str(next((root / "checkpoints").glob(f"*step={step}*.ckpt")))


def test_fit_resume_and_forks_read_consecutive_items(corpus: dict, tmp_path: Path) -> None:
    store, expected = corpus["store"], corpus["items"]
    saved = SaveBatches(str(tmp_path / "a.pt"))
    dm = fit(store, tmp_path / "a", 10, [saved, ChangeWeightsAt(5, {"pile": 1.0, "code": 1.0})])
    run = rows_of(saved)
    rows = pile_rows(run, dm)
    assert np.array_equal(rows, expected[100 : 100 + len(rows)]) and len(rows) > 10
    assert dm.runtime_phases  # the runtime change is in the stream
    # resume from step 8 (after the switch, its ramp and the runtime change): the same rows
    resumed = SaveBatches(str(tmp_path / "b.pt"))
    fit(store, tmp_path / "a", 10, [resumed], ckpt_path=ckpt(tmp_path / "a", 8))
    after = rows_of(resumed)
    assert len(after) == 2 * 2 * 2
    assert all(
        a[0] == b[0] and np.array_equal(a[1], b[1]) for a, b in zip(run[-8:], after, strict=True)
    )
    # keep: the fork reads on from the next unread item; fresh: from its own start_items
    unread = 100 + len(pile_rows(run[: 4 * 4], dm))
    for fork_data, start, first in (("keep", 100, unread), ("fresh", 500, 500)):
        branch = SaveBatches(str(tmp_path / f"{fork_data}.pt"))
        fit(store, tmp_path / fork_data, 7, [branch], ckpt(tmp_path / "a", 4), 4, fork_data, start)
        rows = pile_rows(rows_of(branch), dm)
        assert np.array_equal(rows, expected[first : first + len(rows)]) and len(rows) >= 3
    with pytest.raises(
        MidtrainError,
        match=r"data.start_items.pile: the checkpoint read domain 'pile' from item 100, this run says 7",
    ):
        fit(store, tmp_path / "bad", 7, [], ckpt(tmp_path / "a", 4), 4, "keep", 7)


class RecordRows(pl.Callback):
    """Every micro-batch's domains and rows, one JSON line per batch, a file per rank."""

    def __init__(self, path: str) -> None:
        self.path = path

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        rows = [(d, r.tolist()) for d, r in batch_rows(batch)]
        with Path(f"{self.path}.{trainer.global_rank}").open("a") as f:
            f.write(json.dumps([batch_idx, rows]) + "\n")


@pytest.mark.slow
def test_two_processes_read_consecutive_items(corpus: dict, tmp_path: Path) -> None:
    from tests.test_distributed import free_port

    cfg = {
        "seed_everything": 0,
        "model": {"arch": "tiny", "model_config": TINY, "lr": 1e-3, "warmup": 1},
        "data": {
            "class_path": "midtrain.MixtureDataModule",
            "init_args": {
                "store": str(corpus["store"]), "seq_len": SEQ, "micro_batch_size": 2,
                "weights": {"pile": 0.5, "web": 0.3, "code": 0.2}, "start_items": {"pile": 70},
                "num_workers": 1,
            },
        },
        "trainer": {
            "accelerator": "cpu", "devices": 2, "strategy": "ddp", "max_steps": 6,
            "accumulate_grad_batches": 2, "limit_val_batches": 0, "num_sanity_val_steps": 0,
            "default_root_dir": str(tmp_path / "run"), "enable_progress_bar": False,
            "callbacks": [{"class_path": "tests.test_sequential.RecordRows", "init_args": {"path": str(tmp_path / "rows")}}],
        },
    }  # fmt: skip
    (tmp_path / "fit.yaml").write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    proc = subprocess.run(
        [sys.executable, "-m", "midtrain", "fit", "--config", str(tmp_path / "fit.yaml")],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    slots: dict[tuple[int, int], tuple[int, list[int]]] = {}
    for rank in range(2):
        for line in Path(f"{tmp_path / 'rows'}.{rank}").read_text().splitlines():
            k, rows = json.loads(line)
            step, a = divmod(k, 2)
            for i, row in enumerate(rows):
                slots[(step, (a * 2 + rank) * 2 + i)] = row
    dm = MixtureDataModule(str(corpus["store"]), seq_len=SEQ, start_items={"pile": 70})
    got = pile_rows([(d, np.array(r)) for d, r in (slots[k] for k in sorted(slots))], dm)
    assert len(slots) == 6 * 8 and len(got) > 15
    assert np.array_equal(got, corpus["items"][70 : 70 + len(got)])
